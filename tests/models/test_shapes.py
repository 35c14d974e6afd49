"""The embedded default model (shapes): data, checker, shipped checkpoint, adherence, parity.

Pyramid: scene generator and image checker without any model (ground-truth renders pass,
an image of a different scene fails on exactly the attributes that differ); the shipped
checkpoint through the normal loader and through diffusers (same image, 1 rank); prompt
adherence of a fixed held-out set (1 rank) at the issue's targets; 2-rank gloo runs
(ulysses 2, ring 2) against the 1-rank images. Tolerances: parity images within 1/255,
final latents max abs <= 1e-4 (fp32); ithaca vs diffusers images within 2/255.
"""

import dataclasses
import functools
import json
import random

import numpy as np
import pytest
import torch

from ithaca.models.shapes import shipped_checkpoint_path
from tests.models.harness import generate_fused, record
from tools.shapes import analysis, scenes
from tools.shapes.evaluate import TARGETS, DiffusersGenerator, heldout_cases, run

FAMILY = "shapes (default model)"
"""The support-matrix name of the embedded default model."""

STEPS = 20
N_ADHERENCE = 24


# -- data and checker, no model ---------------------------------------------------------
def test_rendered_scenes_pass_the_checker_at_every_trained_size():
    rng = random.Random(0)
    verdicts = []
    for _ in range(60):
        scene = scenes.sample_scene(rng, "any")
        for w, h in ((128, 128), (96, 96), (160, 160)):
            verdicts.append(analysis.check(scenes.render(scene, w, h), scene))
    assert all(v.all_correct() for v in verdicts), analysis.accuracy(verdicts)


def _swap(scene: scenes.Scene, **changes) -> scenes.Scene:
    shape = dataclasses.replace(scene.shapes[0], **changes)
    return dataclasses.replace(scene, shapes=(shape,))


def test_checker_flags_exactly_the_wrong_attribute():
    scene = scenes.Scene("blue", (scenes.Shape("circle", "red", "large", "top left"),))
    image = scenes.render(scene)
    assert analysis.check(image, scene).all_correct()
    assert not analysis.check(image, dataclasses.replace(scene, background="green")).background
    wrong = {
        "color": _swap(scene, color="yellow"),
        "position": _swap(scene, position="bottom right"),
        "kind": _swap(scene, kind="triangle"),
        "size": _swap(scene, size="small"),
    }
    for attr, other in wrong.items():
        verdict = analysis.check(image, other).shapes[0]
        assert not verdict[attr], attr
        if attr != "color":  # the colour is found, so the other attributes are judged
            assert sum(not ok for ok in verdict.values()) == 1, (attr, verdict)
    # kinds are told apart in both directions
    for kind in scenes.KINDS:
        s = _swap(scene, kind=kind)
        assert analysis.check(scenes.render(s), s).shapes[0]["kind"]


def test_heldout_split_is_disjoint_from_training():
    rng = random.Random(1)
    train = {scenes.sample_scene(rng, "train").key() for _ in range(2000)}
    held = heldout_cases(200)
    assert all(c.scene.held_out() for c in held)
    assert not train & {c.scene.key() for c in held}
    assert len(train) > 1000  # the training split is not degenerate


def test_prompts_name_every_attribute():
    rng = random.Random(2)
    for _ in range(200):
        scene = scenes.sample_scene(rng, "any")
        text = scenes.describe(scene, rng)
        assert scene.background in text
        for s in scene.shapes:
            assert s.color in text
            assert any(k in text for k in scenes.KIND_WORDS[s.kind])


# -- the shipped checkpoint ---------------------------------------------------------------
def test_shipped_checkpoint_is_a_small_qwen_image_directory():
    from pathlib import Path

    path = Path(shipped_checkpoint_path())
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    for sub in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        assert (path / sub).is_dir(), sub
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < 10e6, f"checkpoint is {total / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def ithaca_pipe():
    from ithaca.models.qwen_image.pipeline import QwenImagePipeline
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel.state import ParallelState

    pipe = load_pipeline(shipped_checkpoint_path(), ParallelState.single())
    assert isinstance(pipe, QwenImagePipeline)
    return pipe


def _generate(pipe, prompts, seeds, width=128, height=128, steps=STEPS, cfg=1.0, negative=None):
    from ithaca.types import GenerationParams

    params = [
        GenerationParams(prompt=p, seed=s, width=width, height=height, num_inference_steps=steps,
                         true_cfg_scale=cfg, negative_prompt=negative)
        for p, s in zip(prompts, seeds, strict=True)
    ]  # fmt: skip
    return [r.images[0] for r in pipe.generate(params)]


# Held-out adherence of the shipped model at 20 steps, true CFG 4 (negative " ") against
# the targets (evaluate.TARGETS). On 100 held-out prompts it measures 100%
# background, colour and position and 90% kind (docs/default-model.md).


@pytest.fixture(scope="module")
def adherence(ithaca_pipe):
    cases = heldout_cases(N_ADHERENCE)
    _, verdicts = run(
        lambda *a: _generate(ithaca_pipe, *a[:5], negative=" "),
        cases,
        steps=STEPS,
        cfg=4.0,
        progress=False,
    )
    return analysis.accuracy(verdicts)


def test_prompt_adherence_meets_targets(adherence):
    for attr, target in TARGETS.items():
        assert adherence[attr] >= target, f"{attr}: {adherence[attr]:.1%} < {target:.0%}"


def test_same_image_as_diffusers_reference(ithaca_pipe):
    prompts = ["a large yellow square in the centre on a purple background",
               "a small red circle at the top left and a blue triangle at the bottom right "
               "on a white background"]  # fmt: skip
    seeds = [3, 4]
    latents, decode = [], ithaca_pipe.decode
    ithaca_pipe.decode = lambda job, x: (latents.append(x.float()), decode(job, x))[1]
    try:
        ours = _generate(ithaca_pipe, prompts, seeds)  # one loop per request
    finally:
        del ithaca_pipe.decode
    reference = DiffusersGenerator(shipped_checkpoint_path())
    captured = {}

    def keep(_pipe, _i, _t, tensors):
        captured["latents"] = tensors["latents"].float()
        return tensors

    reference.pipe = functools.partial(reference.pipe, callback_on_step_end=keep)
    ref = reference(prompts, seeds, 128, 128, STEPS, 1.0, "")  # one batched loop
    err = (torch.cat(latents) - captured["latents"]).abs().max().item()
    assert err <= 1e-4, f"ithaca and diffusers latents differ by {err:.2e}"
    worst = 0
    for a, b in zip(ours, ref, strict=True):
        diff = int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
        assert diff <= 2, f"ithaca and diffusers images differ by {diff}/255"
        worst = max(worst, diff)
    record(FAMILY, "1 rank vs diffusers", err, worst)


# -- sequence parallelism -------------------------------------------------------------------
PARITY_BATCH = [
    dict(prompt="a green triangle on the left and a pink square on the right, black background",
         width=128, height=128, num_inference_steps=8, seed=5, request_id="a"),
    dict(prompt="a big orange circle in the middle on a cyan background", width=128,
         height=128, num_inference_steps=8, seed=6, request_id="b"),
]  # fmt: skip


@pytest.fixture(scope="module")
def one_rank():
    return generate_fused({}, shipped_checkpoint_path(), PARITY_BATCH)


TWO_RANKS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2)}


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_ranks_match_one_rank(worker_pool, one_rank, name):
    ref_images, ref_latents, _ = one_rank
    images, latents, info = worker_pool(2).run(
        generate_fused, TWO_RANKS[name], shipped_checkpoint_path(), PARITY_BATCH
    )[0]
    assert info["sharded"], "the sequence was not sharded"
    err = (latents - ref_latents).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err:.2e}"
    worst = 0
    for got, want in zip(images, ref_images, strict=True):
        diff = int(np.abs(got[0].astype(int) - want[0].astype(int)).max())
        assert diff <= 1, f"images differ by {diff}/255"
        worst = max(worst, diff)
    record(FAMILY, name, err, worst)
