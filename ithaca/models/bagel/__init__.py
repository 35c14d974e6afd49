"""Bagel (ByteDance-Seed/BAGEL-7B-MoT): text-to-image and image edit (docs/models.md)."""
