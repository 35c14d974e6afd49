"""Tiny checkpoints, each built once per test session into a temporary directory."""

import importlib

import pytest

from ithaca.testing.tiny import build_tiny_qwen_image


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``{"t2i" | "edit" | "edit_plus": path}`` of tiny Qwen-Image checkpoints (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        kind: str(build_tiny_qwen_image(root / kind, kind)) for kind in ("t2i", "edit", "edit_plus")
    }


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(PipelineClass, seed=0, **overrides)`` -> the path of the tiny checkpoint
    its spec's recipe builds (``spec.tiny`` with ``spec.tiny_args``), built once per session
    for each (recipe, seed, arguments) and shared by every test module."""
    built: dict[tuple, str] = {}

    def build(pipeline: type, seed: int = 0, **overrides) -> str:
        spec = pipeline.spec
        args = {**spec.tiny_args, **overrides}
        key = (spec.tiny, seed, tuple(sorted(args.items())))
        if key not in built:
            module, _, name = spec.tiny.partition(":")
            recipe = getattr(importlib.import_module(module), name)
            path = tmp_path_factory.mktemp(name.removeprefix("build_tiny_"))
            built[key] = str(recipe(path, seed=seed, **args))
        return built[key]

    return build
