"""Helpers for tests and benchmarks: multi-process harness, tiny checkpoints."""
