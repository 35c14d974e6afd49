"""Prompt templates of the Qwen-Image reference pipelines (diffusers), and their drop index.

The text encoder sees the prompt inside a chat template; the first ``drop`` tokens (the
system turn) are removed from its last hidden state. Both are read from diffusers'
pipelines (``prompt_template_encode``, ``prompt_template_encode_start_idx``): the counts
are those of the real Qwen2.5-VL tokenizer; the tiny tokenizer (``ithaca.testing.tiny``)
is built so that the same prefixes have the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers

from ithaca.models.flow import reference_pipeline

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    """Chat template with one ``{}`` for the user turn."""
    drop: int
    """Tokens of the system turn removed from the encoder output."""
    per_image: str = ""
    """What the user turn starts with per input image (``{}``: its number from 1)."""

    @property
    def prefix(self) -> str:
        """The dropped part: everything up to and including ``<|im_start|>user\\n``."""
        return self.text[: self.text.index("<|im_start|>user\n") + len("<|im_start|>user\n")]

    def format(self, user: str, images: int = 0) -> str:
        """The template around ``user``, after ``per_image`` for each of ``images``."""
        return self.text.format("".join(self.per_image.format(i + 1) for i in range(images)) + user)


def _reference(name: str, per_image: str = "") -> PromptTemplate:
    ref = reference_pipeline(getattr(diffusers, name))
    return PromptTemplate(
        ref.prompt_template_encode, ref.prompt_template_encode_start_idx, per_image
    )


T2I = _reference("QwenImagePipeline")
EDIT = _reference("QwenImageEditPipeline")
"""One input image, its vision tokens before the prompt."""
EDIT_PLUS = _reference("QwenImageEditPlusPipeline", per_image="Picture {}: " + VISION)
"""``Picture i: <vision>`` per image, then the prompt."""


# The Qwen2.5-VL tokenizer's special tokens the templates use (first: end of text).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
