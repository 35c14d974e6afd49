"""Adding a family is a spec and two methods (``docs/models.md`` "Adding a family").

One process: a new family, "FLUX.1-schnell conditioned on CLIP alone", is declared
here, registered for its own ``_class_name`` and served end to end by the shared
pipeline; its final latents equal diffusers' ``FluxPipeline`` given the same prompt
embeddings within 1e-5 (fp32), its images come back at the requested size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ithaca.models import registry
from ithaca.models.flow import FlowMatchPipeline
from ithaca.models.flux.transformer import FLUX_ATTENTION, FluxTransformer2DModel
from ithaca.models.spec import FamilySpec
from ithaca.parallel import ParallelState
from ithaca.testing.tiny_families import build_tiny_flux
from ithaca.types import GenerationParams


class ClipFluxPipeline(FlowMatchPipeline):
    """FLUX.1-schnell's transformer on CLIP's hidden states and pooled output."""

    spec = FamilySpec(
        name="CLIP-FLUX",
        transformer=FluxTransformer2DModel,
        attention=FLUX_ATTENTION,
        defaults={"width": 32, "height": 32, "num_inference_steps": 2, "true_cfg_scale": 1.0},
    )

    @torch.no_grad()
    def encode_prompt(self, text: str) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out = self.text_encoder(ids.to(self.device))  # the transformer's arguments, by name
        return {"encoder_hidden_states": out.last_hidden_state[0],
                "pooled_projections": out.pooler_output[0]}  # fmt: skip

    def forward_inputs(self, requests, conds, latents) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        h, w = self.latent_hw(requests[0])
        ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        return {"img_ids": ids, "txt_ids": torch.zeros(77, 3, device=self.device)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_tiny_flux(tmp_path_factory.mktemp("clip_flux"), seed=5, guidance_embeds=False)
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(dict(index, _class_name="ClipFluxPipeline")))
    registry.register("ClipFluxPipeline", ClipFluxPipeline)
    yield str(path)
    registry.PIPELINES.pop("ClipFluxPipeline")
    index_path.write_text(json.dumps(index))  # diffusers' reference loads it as FLUX.1


def test_a_registered_spec_runs_end_to_end(checkpoint):
    pipe = registry.load_pipeline(checkpoint, ParallelState.single())
    assert type(pipe) is ClipFluxPipeline
    assert not hasattr(pipe, "text_encoder_2")  # only the spec's components are loaded
    params = GenerationParams(prompt="a red cat", seed=7, num_images=2, width=48, height=32)
    (result,) = pipe.generate([params])
    assert [im.size for im in result.images] == [(48, 32), (48, 32)]
    assert result.metadata["num_inference_steps"] == 2  # the spec's default
    first, second = (np.asarray(im).astype(int) for im in result.images)
    assert np.abs(first - second).max() > 0  # two noise draws, two images


def test_its_latents_equal_diffusers(checkpoint):
    pipe = registry.load_pipeline(checkpoint, ParallelState.single())
    params = GenerationParams(prompt="a red cat", seed=7, width=48, height=32)
    requests = [pipe.resolve(params)]
    conds = pipe.conditions(requests)
    job = pipe.prepare(requests, conds)
    pipe.denoise(job)
    pipe.runtime.remove()

    index_path = f"{checkpoint}/model_index.json"
    with open(index_path) as f:
        index = json.load(f)
    from diffusers import FluxPipeline

    with open(index_path, "w") as f:  # the reference reads the checkpoint as FLUX.1
        json.dump(dict(index, _class_name="FluxPipeline"), f)
    try:
        reference = FluxPipeline.from_pretrained(checkpoint)
    finally:
        with open(index_path, "w") as f:
            json.dump(index, f)
    reference.set_progress_bar_config(disable=True)
    embeds = conds[0]["positive"]
    latents = reference(
        prompt_embeds=embeds["encoder_hidden_states"][None],
        pooled_prompt_embeds=embeds["pooled_projections"][None],
        width=48,
        height=32,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
    ).images
    assert (job.latents - latents).abs().max().item() <= 1e-5
