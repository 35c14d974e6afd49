"""FLUX.1 (black-forest-labs/FLUX.1-dev, FLUX.1-schnell)."""
