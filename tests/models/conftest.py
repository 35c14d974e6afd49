"""Tiny checkpoints, built once per session into a temporary directory."""

import pytest

from ithaca.testing.tiny import build_tiny_qwen_image


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``{"t2i" | "edit" | "edit_plus": path}`` of tiny Qwen-Image checkpoints (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        kind: str(build_tiny_qwen_image(root / kind, kind)) for kind in ("t2i", "edit", "edit_plus")
    }
