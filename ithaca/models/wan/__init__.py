"""Wan2.2 video models: T2V-A14B (two experts), I2V-A14B, TI2V-5B."""
