"""Tiny random LoRA adapters for tests, in the formats users bring.

- :func:`random_lora`: a diffusers-format state dict (``transformer.<layer>.lora_A/B``)
  for the Linear layers of a transformer whose names end in one of ``targets``;
- :func:`to_comfy`: the same adapter as a kohya/ComfyUI file (``diffusion_model.``
  prefix, ``lora_down`` / ``lora_up`` and an ``alpha`` per layer), which diffusers'
  converters map back (Qwen-Image, Wan);
- :func:`save_peft_folder`: a PEFT adapter folder (LoRA, LoHa or LoKr) with random
  weights.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2", "proj_out",
           "attn1.to_q", "attn2.to_v")  # fmt: skip


def lora_layers(model: nn.Module, targets=TARGETS) -> list[str]:
    """Names of the Linear layers of ``model`` an adapter on ``targets`` touches."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]


def random_lora(model: nn.Module, rank: int = 4, seed: int = 0, std: float = 0.2,
                targets=TARGETS) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random adapter in diffusers' layout: ``delta W = B @ A`` per touched layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in lora_layers(model, targets):
        layer = model.get_submodule(name)
        a = torch.randn(rank, layer.in_features, generator=generator) * std
        b = torch.randn(layer.out_features, rank, generator=generator) * std
        state[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        state[f"transformer.{name}.lora_B.weight"] = b.contiguous()
    return state


def to_comfy(state: dict[str, torch.Tensor], alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI layout of a diffusers-format adapter (the converters divide by
    ``alpha / rank``, so the file stores the weights that undo it)."""
    out = {}
    for key, value in state.items():
        layer = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        base = f"diffusion_model.{layer}"
        if ".lora_A." in key:
            rank = value.shape[0]
            out[f"{base}.lora_down.weight"] = value
            out[f"{base}.alpha"] = torch.tensor(float(alpha))
        else:
            rank = value.shape[1]
            out[f"{base}.lora_up.weight"] = value * (rank / alpha)
    return out


def save_safetensors(state: dict[str, torch.Tensor], path) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def save_peft_folder(model: nn.Module, path, kind: str = "loha", rank: int = 4, seed: int = 0,
                     targets=("to_q", "to_v", "ff.net.2"), std: float = 0.5) -> str:  # fmt: skip
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    of ``kind`` (``lora``, ``loha``, ``lokr``) with random weights, for ``model``'s
    layers; ``model`` is left as it was."""
    import copy

    from peft import (
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        get_peft_model_state_dict,
        inject_adapter_in_model,  # fmt: skip
    )

    layers = lora_layers(model, targets)
    config = {
        "lora": lambda: LoraConfig(
            r=rank, lora_alpha=rank, target_modules=layers, init_lora_weights=False
        ),
        "loha": lambda: LoHaConfig(r=rank, alpha=rank, target_modules=layers, init_weights=False),
        "lokr": lambda: LoKrConfig(r=rank, alpha=rank, target_modules=layers, init_weights=False),
    }[kind]()
    torch.manual_seed(seed)
    clone = inject_adapter_in_model(config, copy.deepcopy(model), adapter_name="default")
    state = get_peft_model_state_dict(clone, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)  # peft's init is too small to see
    state = {f"base_model.model.{k}": torch.randn(v.shape, generator=generator) * std
             for k, v in sorted(state.items())}  # fmt: skip
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(str(path))
    save_safetensors(state, os.path.join(path, "adapter_model.safetensors"))
    return str(path)
