"""Step caches on the image families: FLUX.1-dev and -schnell, Z-Image, SD3.5,
LongCat-Image (+Edit) and Ovis-Image, each with TeaCache and Cache-DiT's DBCache.

Pyramid: cache mechanics on the toy model in tests/cache; here each family's whole
pipeline on its tiny checkpoint, 5 steps. One in-process 1-rank load per family runs
the request uncached, never skipping (threshold 0: the uncached latents and image bit
for bit) and skipping (a hit ratio above 0, a changed image) with each backend. Then 2
gloo ranks run the skipping configurations under ulysses 2, ring 2 and, for the
families whose request uses true CFG, cfg 2: images within 1/255 of the 1-rank cached
run, latents within 1e-4, the same cache counts, and every rank's ``(step, branch,
cached)`` pattern equal to the 1-rank one (its own branch's under cfg 2). ``ithaca
calibrate-teacache --write`` runs on each family (edit models with ``--image``), and
its fit in the checkpoint's ``ithaca.json`` replaces FLUX.1's default coefficients.

The images are 28x20 px (35 packed tokens: every sequence-parallel FLUX-like run pads
with ``auto_pad``, so distances leave padding out), prompts are at most 32 text tokens.
TeaCache's threshold sits between the accumulated distances of skipped and computed
steps with a margin of 0.07 or more; DBCache's threshold is above every distance and
``max_continuous_cached_steps=1`` makes it alternate, so no layout's rounding can flip a
decision.
"""

import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from ithaca.cache import FLUX_COEFFICIENTS
from ithaca.cli import main
from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.longcat_image.pipeline import LongCatImageEditPipeline, LongCatImagePipeline
from ithaca.models.ovis_image.pipeline import OvisImagePipeline
from ithaca.models.registry import load_pipeline
from ithaca.models.sd3.pipeline import StableDiffusion3Pipeline
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.parallel import ParallelState
from tests.models.harness import LAYOUTS, check_layout, generate, record

STEPS = 5
NEVER = {
    "tea_cache": {"rel_l1_thresh": 0.0},
    "cache_dit": {"residual_diff_threshold": 0.0, "max_warmup_steps": 0},
}
DBCACHE_SKIP = {"residual_diff_threshold": 2.0, "max_warmup_steps": 1,
                "max_continuous_cached_steps": 1, "enable_taylorseer": True}  # fmt: skip
BACKENDS = list(NEVER)
TEXT = {"max_sequence_length": 32}  # text tokens per prompt (the families' defaults: 256-512)
CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)
BASE = dict(prompt="a red cat", width=28, height=20, num_inference_steps=STEPS, seed=3)


def _edit_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Family:
    pipeline: type
    """The family's pipeline: its spec's tiny recipe writes the checkpoint."""
    request: dict
    layouts: tuple[str, ...] = ("ulysses2", "ring2", "cfg2")
    attrs: dict = field(default_factory=lambda: dict(TEXT))
    default_cfg: bool = True
    """Whether the family's default request (calibration's) runs true CFG."""
    tiny: dict = field(default_factory=dict)
    """Arguments of the tiny recipe (default: seed 0, the parity tests' checkpoint)."""
    tea_thresh: float = 0.3
    """TeaCache's skipping threshold: a step's rescaled distance is 0.19-0.23 on the
    FLUX-like tiny models (skip one, compute the next), 3-6 on Z-Image's."""


FAMILIES = {
    # FLUX.1-dev with embedded guidance only (its usual use): no second branch.
    "FLUX.1-dev": Family(FluxPipeline, dict(BASE, guidance_scale=3.5), ("ulysses2", "ring2"),
                         default_cfg=False),
    # schnell's blocks are dev's (no guidance input): 1 rank only.
    "FLUX.1-schnell": Family(FluxPipeline, BASE, (), default_cfg=False,
                             tiny=dict(seed=1, guidance_embeds=False)),
    "Z-Image": Family(ZImagePipeline, dict(BASE, **CFG), default_cfg=False, tea_thresh=4.0),
    "SD3.5": Family(StableDiffusion3Pipeline, dict(BASE, **CFG)),
    "LongCat-Image": Family(LongCatImagePipeline, dict(BASE, **CFG)),
    "LongCat-Image-Edit": Family(
        LongCatImageEditPipeline,
        dict(BASE, **CFG, images=[_edit_image()]),  # 80x48 px output: 15 + 15 image tokens
        attrs=dict(TEXT, default_width=80, default_height=40)),  # a 3200 px edit area
    "Ovis-Image": Family(OvisImagePipeline, dict(BASE, **CFG)),
}  # fmt: skip


def _pick(run: tuple, j: int) -> tuple:
    """Request ``j`` of a ``generate`` result, as the result of a one-request batch."""
    images, latents, info = run
    return images[j : j + 1], latents[j : j + 1], dict(info, metadata=info["metadata"][j : j + 1])


class Runs:
    """A family's tiny checkpoint and its 1-rank run of every cache configuration."""

    def __init__(self, name: str, tiny_family):
        self.name, self.spec = name, FAMILIES[name]
        self.path = tiny_family(self.spec.pipeline, **self.spec.tiny)
        tea = {"rel_l1_thresh": self.spec.tea_thresh}
        self.skipping = {"tea_cache_skip": ("tea_cache", tea),
                         "cache_dit_skip": ("cache_dit", DBCACHE_SKIP)}  # fmt: skip
        """What a layout runs: ``request_id -> (backend, options)``."""
        never = {f"{b}_never": (b, NEVER[b]) for b in BACKENDS}
        self.configs = {"uncached": (None, None), **never, **self.skipping}
        self.one_rank = generate({}, self.path, self.batch(self.configs), self.spec.attrs)

    def batch(self, configs: dict) -> list[dict]:
        """The family's request once per ``{request_id: (backend, options)}``."""
        return [
            dict(self.spec.request, request_id=rid, cache_backend=backend, cache_config=options)
            for rid, (backend, options) in configs.items()
        ]

    def pick(self, rid: str) -> tuple:
        """One request of the 1-rank run, as a one-request ``generate`` result."""
        return _pick(self.one_rank, list(self.configs).index(rid))

    def result(self, rid: str) -> tuple:
        """``(images, latents, metadata)`` of one request of the 1-rank run."""
        images, latents, info = self.pick(rid)
        return images[0], latents[0], info["metadata"][0]

    @property
    def branches(self) -> int:
        return 2 if "negative_prompt" in self.spec.request else 1


@pytest.fixture(scope="module")
def runs(tiny_family):
    """``runs(name)``: the family's :class:`Runs`, built once per module."""
    built: dict[str, Runs] = {}

    def get(name: str) -> Runs:
        if name not in built:
            built[name] = Runs(name, tiny_family)
        return built[name]

    return get


each_family = pytest.mark.parametrize("name", FAMILIES)


@pytest.mark.parametrize("backend", BACKENDS)
@each_family
def test_never_skipping_is_the_uncached_output(runs, name, backend):
    family = runs(name)
    images, latents, meta = family.result(f"{backend}_never")
    ref_images, ref_latents, _ = family.result("uncached")
    assert meta["cache"]["cached_steps"] == 0
    assert meta["cache"]["computed_steps"] == STEPS * family.branches
    assert torch.equal(latents, ref_latents)
    assert all(np.array_equal(a, b) for a, b in zip(images, ref_images, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@each_family
def test_skipping_hits_and_changes_the_output(runs, name, backend):
    family = runs(name)
    _, latents, meta = family.result(f"{backend}_skip")
    stats, total = meta["cache"], STEPS * family.branches
    assert stats["backend"] == backend
    assert stats["cached_steps"] > 0 and stats["computed_steps"] + stats["cached_steps"] == total
    assert stats["hit_ratio"] == pytest.approx(stats["cached_steps"] / total, abs=1e-4)
    assert len(stats["pattern"]) == total
    if backend == "cache_dit":  # warmup 1, then cached runs of 1; the last step computes
        for branch in range(family.branches):
            cached = [c for _, b, c in stats["pattern"] if b == branch]
            assert cached == [False, True, False, True, False], stats["pattern"]
    assert not torch.equal(latents, family.result("uncached")[1])  # skipping changed it


LAYOUT_CASES = [(name, layout) for name, spec in FAMILIES.items() for layout in spec.layouts]


@pytest.mark.parametrize("name,layout", LAYOUT_CASES, ids=[f"{n}-{x}" for n, x in LAYOUT_CASES])
def test_layout_caches_like_one_rank(worker_pool, runs, name, layout):
    family = runs(name)
    batch = family.batch(family.skipping)
    results = worker_pool(2).run(generate, LAYOUTS[layout], family.path, batch, family.spec.attrs)
    for j, (rid, (backend, _)) in enumerate(family.skipping.items()):
        ours, ref = [_pick(r, j) for r in results], family.pick(rid)
        err, diff = check_layout(ours, ref)  # latents within 1e-4, images within 1/255
        expected = dict(ref[2]["metadata"][0]["cache"])
        ref_pattern = expected.pop("pattern")
        for rank, (_, _, info) in enumerate(ours):
            stats = dict(info["metadata"][0]["cache"])
            if layout == "cfg2":  # cfg rank r runs branch r only
                assert stats.pop("pattern") == [p for p in ref_pattern if p[1] == rank]
            else:
                assert stats.pop("pattern") == ref_pattern, f"rank {rank} skipped other steps"
            assert stats == expected  # counts summed over the cfg ranks
        record(family.name, layout, err, diff, cache=backend)


@each_family
def test_calibrate_teacache_command_sets_the_default(runs, name, tmp_path, capsys):
    family = runs(name)
    path = tmp_path / "model"
    shutil.copytree(family.path, path)
    argv = ["calibrate-teacache", str(path), "--prompt", "a red cat", "--num-inference-steps",
            "4", "--width", "28", "--height", "20", "--degree", "2", "--write"]  # fmt: skip
    for i, image in enumerate(family.spec.request.get("images", [])):  # edit models
        image.save(tmp_path / f"in{i}.png")
        argv += ["--image", str(tmp_path / f"in{i}.png")]
    pipe = load_pipeline(str(path), ParallelState.single())  # reads ithaca.json when asked
    # no fit of its own yet: FLUX.1's published one
    assert pipe.cache_adapter().teacache_coefficients == FLUX_COEFFICIENTS
    assert main(argv) == 0
    # one sample per step after the first, per branch of the family's default request
    samples = 3 * (2 if family.spec.default_cfg else 1)
    assert capsys.readouterr().out.startswith(f"# {samples} (input change, output change)")
    fitted = json.loads((path / "ithaca.json").read_text())["teacache_coefficients"]
    assert len(fitted) == 3 and all(np.isfinite(fitted))
    assert pipe.cache_adapter().teacache_coefficients == tuple(fitted)
