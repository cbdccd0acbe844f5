"""The adaptive control plane: staleness, the PID, admission credits, the group ledger, the batch composer.

Pure bookkeeping over numbers and messages, no sockets: the controller and buffer actors drive it."""
