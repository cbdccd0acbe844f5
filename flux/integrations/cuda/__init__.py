"""CUDA-only pieces of the core's paths, reached through flux.plugins hooks."""
