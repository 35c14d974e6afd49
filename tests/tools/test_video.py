"""The default video model's world: clips, prompts, the checker, the tokenizer and the
VAE made from the image model's (tools/video)."""

import random

import numpy as np
import pytest
import torch

from tools.shapes.vocabulary import known_words
from tools.video import clips, components, evaluate
from tools.video.train import KEY_FRAMES, encode_clips, load_image_vae, vocabulary
from tools.video.vae import from_image_vae


def test_the_checker_is_right_on_ground_truth_and_wrong_on_swapped_clips():
    cases = evaluate.heldout_cases(40, seed=7)
    truth = [evaluate.check(clips.render_clip(c.scene), c.scene) for c in cases]
    assert evaluate.accuracy(truth)["all"] == 1.0
    moving = [c.scene for c in cases if c.scene.start != c.scene.end]
    backwards = [
        evaluate.check(clips.render_clip(clip)[::-1], clip) for clip in moving
    ]  # played backwards: start and end swapped
    assert not any(v["start"] or v["end"] for v in backwards)


def test_held_out_clips_never_train_and_prompts_say_the_motion():
    rng = random.Random(0)
    train = [clips.sample_clip(rng, "train") for _ in range(300)]
    assert not any(c.held_out() for c in train)
    assert all(c.held_out() for c in (clips.sample_clip(rng, "heldout") for _ in range(50)))
    share = np.mean([clips.sample_clip(rng, "any").held_out() for _ in range(2000)])
    assert 0.07 < share < 0.13
    clip = clips.Clip("blue", "circle", "red", "red", "medium", "medium", "left", "right")
    assert clips.describe(clip, random.Random(3)) in {
        "a red circle moving from the left to the right on a blue background",
        "a red disc moving from the left to the right on a blue background",
        "on a blue background, a red circle moving from the left to the right",
        "on a blue background, a red disc moving from the left to the right",
        "a red circle moving from the left to the right, blue background",
        "a red disc moving from the left to the right, blue background",
        "a red circle sliding from the left to the right on a blue background",
        "a red disc sliding from the left to the right on a blue background",
        "on a blue background, a red circle sliding from the left to the right",
        "on a blue background, a red disc sliding from the left to the right",
        "a red circle sliding from the left to the right, blue background",
        "a red disc sliding from the left to the right, blue background",
    }


def test_every_prompt_word_is_one_known_token():
    tok = components.build_tokenizer(vocabulary())
    rng = random.Random(1)
    for _ in range(200):
        prompt = clips.describe(clips.sample_clip(rng, "any"), rng)
        words = prompt.replace(",", "").split()
        assert set(words) <= known_words(video=True), prompt
        pieces = tok.tokenize(prompt)
        assert [p.lstrip("\u2581") for p in pieces if p != ","] == words
    assert tok.unk_token_id not in tok("a purple fox in snow").input_ids  # byte-free fallback


@pytest.fixture(scope="module")
def vaes():
    image_vae = load_image_vae()
    return image_vae, from_image_vae(image_vae)


def test_video_vae_is_the_image_vae_on_key_frames(vaes):
    image_vae, vae = vaes
    batch = [clips.sample_clip(random.Random(s), "any") for s in range(2)]
    x = torch.from_numpy(clips.to_video_tensor([clips.render_clip(c) for c in batch]))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean  # (2, 16, 5, 8, 8)
        video = vae.decode(z).sample  # (2, 3, 17, 64, 64)
        keys = image_vae.decode(
            z.transpose(1, 2).reshape(-1, 16, 1, 8, 8)
        ).sample  # (10, 3, 1, 64, 64)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close((z - mean) / std, encode_clips(image_vae, batch), atol=1e-5, rtol=0)
    keys = keys.view(2, 5, 3, 64, 64).transpose(1, 2)
    for k, frame in enumerate(KEY_FRAMES):  # latent frame k -> frames 4k-3 .. 4k
        for f in range(max(0, frame - 3), frame + 1):
            torch.testing.assert_close(video[:, :, f], keys[:, :, k], atol=1e-4, rtol=0)
