"""Prompt templates of the Qwen-Image reference pipelines (diffusers), and their drop index.

The text encoder sees the prompt inside a chat template; the first ``drop`` tokens (the
system turn) are removed from its last hidden state. The counts are those of the real
Qwen2.5-VL tokenizer; the tiny tokenizer (``ithaca.testing.tiny``) is built so that the
same prefixes have the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_T2I = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
SYSTEM_EDIT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate."
)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    """Chat template with one ``{}`` for the user turn."""
    drop: int
    """Tokens of the system turn removed from the encoder output."""

    @property
    def prefix(self) -> str:
        """The dropped part: everything up to and including ``<|im_start|>user\\n``."""
        return self.text[: self.text.index("<|im_start|>user\n") + len("<|im_start|>user\n")]

    def format(self, user: str) -> str:
        return self.text.format(user)


def _chat(system: str, user: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


T2I = PromptTemplate(_chat(SYSTEM_T2I, "{}"), drop=34)
"""QwenImagePipeline."""
EDIT = PromptTemplate(_chat(SYSTEM_EDIT, VISION + "{}"), drop=64)
"""QwenImageEditPipeline: one input image, its vision tokens before the prompt."""
EDIT_PLUS = PromptTemplate(_chat(SYSTEM_EDIT, "{}"), drop=64)
"""QwenImageEditPlusPipeline: ``Picture i: <vision>`` per image, then the prompt."""


def edit_plus_user_turn(num_images: int, prompt: str) -> str:
    return "".join(f"Picture {i + 1}: {VISION}" for i in range(num_images)) + prompt


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
