"""The Bagel golden fixtures (``<repo>/../shared/bagel-golden``, README there): lookup,
loading and the README's tolerances, shared by the ``test_bagel*`` modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [
    os.environ.get("ITHACA_BAGEL_GOLDEN", ""),
    str(_REPO.parent / "shared" / "bagel-golden"),
    "/work/shared/bagel-golden",
]
GOLDEN = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "checkpoint").is_dir()), None)
CHECKPOINT = str(GOLDEN / "checkpoint") if GOLDEN else ""
FP32_CASES = ("a_t2i_64x64", "b_t2i_48x64_cfgimg", "c_edit_112x224", "d_t2i_64x32_interval")

requires_golden = pytest.mark.skipif(
    GOLDEN is None,
    reason="Bagel golden fixtures not found: set ITHACA_BAGEL_GOLDEN or place shared/"
    "bagel-golden next to the repository",
)


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    with open(folder(name) / "case.json") as f:
        case = json.load(f)
    return case, load_file(str(folder(name) / "tensors.safetensors"))


def golden_request(name: str, **extra):
    """The serving request of a golden case: its prompt, size, seed, settings and (edits)
    input image, decoded now (:func:`ithaca.types.open_image`) so it pickles to every rank."""
    from ithaca.types import GenerationParams, open_image

    case, _ = load_case(name)
    h, w = case["image_hw"]
    images = [open_image(folder(name) / "input.png")] if case["task"] == "edit" else []
    return GenerationParams(prompt=case["prompt"], width=w, height=h, seed=case["seed"],
                            images=images, model_options=case["params"], **extra)  # fmt: skip


def folder(name: str) -> Path:
    return GOLDEN / "cases" / name


def assert_close(ours: torch.Tensor, ref: torch.Tensor, name: str) -> float:
    """README tolerance ``|ours - ref| <= 1e-4 + 1e-4 |ref|``; returns the worst ratio."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ratio = ((ours.float() - ref.float()).abs() / (1e-4 + 1e-4 * ref.float().abs())).max()
    assert ratio <= 1, f"{name}: worst error is {ratio:.2f}x the tolerance"
    return float(ratio)


def image_levels(ours: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    """(max level difference, fraction of values that differ) of two uint8 images."""
    diff = (ours.int() - ref.int()).abs()
    return int(diff.max()), float((diff > 0).float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(255.0**2 / mse))
