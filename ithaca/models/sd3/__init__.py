"""Stable Diffusion 3 / 3.5 (stabilityai/stable-diffusion-3.5-large, -medium)."""
