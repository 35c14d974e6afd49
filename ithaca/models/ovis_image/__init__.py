"""Ovis-Image (AIDC-AI/Ovis-Image)."""
