"""Z-Image (Tongyi-MAI/Z-Image-Turbo)."""
