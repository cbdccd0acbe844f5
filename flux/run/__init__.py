"""The coordinator: the launcher, what every actor process shares (runtime), the wire messages (protocol),
weight slots in shared memory / CUDA IPC (weights), and atomic checkpoints."""
