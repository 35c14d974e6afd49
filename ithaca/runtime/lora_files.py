"""One LoRA adapter file into one transformer: read, checked, cut for the layout, injected.

A file is read by the family's diffusers pipeline class (its ``lora_state_dict``
converts kohya/ComfyUI, Lightning and other community layouts to diffusers keys) and
injected into the transformer by its ``load_lora_into_transformer`` (peft underneath);
a PEFT adapter folder (``adapter_config.json``: LoRA, LoHa, LoKr) goes through peft's
``inject_adapter_in_model`` + ``set_peft_model_state_dict``. Before anything is
injected, every key is checked against the transformer (:func:`check_fits`: a file
that does not fit names its first unmatched key and the model, and nothing is loaded)
and cut the way the layer it touches is split on this rank (:func:`split_for_layout`).
Which adapters are loaded and active is :mod:`ithaca.runtime.lora`'s table.
"""

from __future__ import annotations

import logging
import os
import re

from torch import nn
from torch.distributed.tensor import DTensor

from ithaca.parallel.hsdp import local_rows
from ithaca.parallel.tensor import adapter_split, take

_LORA_PARTS = (".lora_A", ".lora_B", ".lora_down", ".lora_up", ".lora_magnitude_vector")


def read_adapter(loader: type | None, path: str):
    """``(kind, state dict, extra)``: a PEFT folder ``("peft", weights, config)``; a file
    through the family's converter ``("diffusers", transformer keys, load kwargs)``."""
    if os.path.isdir(path):
        from peft import PeftConfig
        from safetensors.torch import load_file

        config = PeftConfig.from_pretrained(path)
        return "peft", load_file(os.path.join(path, "adapter_model.safetensors")), config
    if loader is None or not hasattr(loader, "lora_state_dict"):
        from safetensors.torch import load_file

        return "diffusers", load_file(path), {}
    folder, weight_name = os.path.split(os.path.abspath(path))
    kwargs = dict(weight_name=weight_name, return_lora_metadata=True)
    extra = {}
    if "return_alphas" in _parameters(loader.lora_state_dict):  # FLUX.1's converter
        state, alphas, metadata = loader.lora_state_dict(folder, return_alphas=True, **kwargs)
        extra["network_alphas"] = alphas
    else:
        state, metadata = loader.lora_state_dict(folder, **kwargs)
    extra["metadata"] = metadata
    return "diffusers", state, extra


def load_adapter(loader, model: nn.Module, name: str, path: str, family: str) -> None:
    """Load one adapter into ``model`` as ``name``, after checking it fits."""
    kind, state, extra = read_adapter(loader, path)
    if kind == "peft":
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        check_fits(state, model, family, path, prefix="base_model.model.")
        state = split_for_layout(state, model, family, path, prefix="base_model.model.")
        inject_adapter_in_model(extra, model, adapter_name=name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if result.unexpected_keys:  # checked above; a mismatch here is ours
            model.delete_adapters(name)
            raise ValueError(f"{path}: {family} took none of {result.unexpected_keys[:1]}")
        model._hf_peft_config_loaded = True
        return
    prefix = "transformer."
    other = next((k for k in state if not k.startswith(prefix)), None)
    if other is not None and any(k.startswith(prefix) for k in state):
        raise ValueError(
            f"LoRA {path}: key {other!r} is not for the transformer (text-encoder LoRAs "
            f"are not supported for {family})"
        )
    check_fits(state, model, family, path, prefix=prefix)
    state = split_for_layout(state, model, family, path, prefix=prefix)
    peft_log = logging.getLogger("diffusers.utils.peft_utils")
    own = _OwnMissingKeys(name)
    peft_log.addFilter(own)
    try:
        if loader is not None and hasattr(loader, "load_lora_into_transformer"):
            accepted = _parameters(loader.load_lora_into_transformer)
            kwargs = {k: v for k, v in extra.items() if k in accepted}
            loader.load_lora_into_transformer(state, transformer=model, adapter_name=name, **kwargs)
        else:
            model.load_lora_adapter(state, prefix="transformer", adapter_name=name)
    finally:
        peft_log.removeFilter(own)
    # Every loaded key must have been placed.
    if name not in getattr(model, "peft_config", {}):
        raise ValueError(f"LoRA {path}: nothing in it fits {family}")


class _OwnMissingKeys(logging.Filter):
    """diffusers reports as missing every adapter key that merely *contains* the new
    adapter's name (adapter ``b`` lists adapter ``a``'s ``transformer_blocks...lora_A.a``
    keys): keep only keys whose adapter segment is this name, and drop the warning if none."""

    HEAD = "Loading adapter weights from state_dict led to missing keys in the model: "

    def __init__(self, name: str):
        super().__init__()
        self.segment = re.compile(
            rf"\.(lora_[AB]|lora_magnitude_vector|lokr_\w+)\.{re.escape(name)}(\.|$)"
        )

    def filter(self, record: logging.LogRecord) -> bool:
        before, head, keys = record.getMessage().partition(self.HEAD)
        if not head:
            return True
        own = [k for k in keys.rstrip(".").split(", ") if self.segment.search(k)]
        text = before + (head + ", ".join(own) + "." if own else "")
        record.msg, record.args = text, ()
        return bool(text.strip())


def check_fits(state: dict, model: nn.Module, family: str, path: str, prefix: str) -> None:
    """Raise ``ValueError`` naming the first key that names no layer of ``model`` or
    whose shape does not fit that layer."""
    modules = dict(model.named_modules())
    for key in sorted(state):
        name = key.removeprefix(prefix)
        layer = _layer_name(name)
        if layer is None:
            if name.endswith(".alpha"):
                continue
            raise ValueError(f"LoRA {path}: key {key!r} is no adapter weight {family} takes")
        module = modules.get(layer)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear | nn.Conv2d | nn.Conv3d):
            raise ValueError(f"LoRA {path}: key {key!r} matches no layer of {family}")
        shape, full = tuple(state[key].shape), list(base.weight.shape)  # HSDP: global
        if (split := adapter_split(model, layer)) is not None:  # TP: the unsplit size
            full[split[0]] = split[2]
        if _down(name) and shape[1] != full[1] and len(shape) == 2:
            raise ValueError(
                f"LoRA {path}: key {key!r} has shape {shape}, {family}'s {layer} takes "
                f"{full[1]} inputs"
            )
        if _up(name) and shape[0] != full[0]:
            raise ValueError(
                f"LoRA {path}: key {key!r} has shape {shape}, {family}'s {layer} has "
                f"{full[0]} outputs"
            )


def split_for_layout(state: dict, model: nn.Module, family: str, path: str, prefix: str) -> dict:
    """``state`` (checked by :func:`check_fits`) with every tensor on a split layer cut
    the way that layer's weight is, so this rank holds only its slice of the adapter:

    - tensor parallel (:func:`adapter_split`, from the model's own TP plan): a
      column-parallel layer keeps this rank's rows of ``lora_B`` (and of its bias),
      ``lora_A`` whole; a row-parallel layer keeps this rank's columns of ``lora_A``,
      ``lora_B`` whole (its partial output joins the layer's all-reduce);
    - HSDP: an FSDP2-sharded layer keeps the rows of ``lora_B`` its weight shard holds
      (``local_rows``), ``lora_A`` whole: such adapters are always fused, each rank
      adding its rows of ``B A`` to its own shard (:func:`_merge_rows`).

    peft makes the adapters of a split layer in its local shapes. Adapters that do not
    factor that way (a bias on a row-parallel layer would be added by every rank; DoRA,
    LoHa, LoKr) raise ``ValueError`` naming the key, before anything is loaded."""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix(prefix)
        layer = _layer_name(name)
        split = _split_of(model, layer) if layer is not None else None
        if split is None:  # a replicated layer (or an alpha): whole on every rank
            out[key] = tensor
            continue
        dim, pieces, how, bias = split
        weight = name.endswith(".weight")
        cut = (dim == 1 and _down(name) and weight) or (dim == 0 and _up(name) and (weight or bias))
        whole = (dim == 0 and _down(name)) or (dim == 1 and _up(name) and weight)
        if not cut and not whole:
            raise ValueError(
                f"LoRA {path}: key {key!r} is on {family}'s layer {layer}, split by {how}, and "
                f"cannot be split with it (plain LoRA only; a lora_B bias only on a "
                f"column-parallel layer)"
            )
        out[key] = take(tensor, pieces) if cut and pieces else tensor
    return out


def _split_of(model: nn.Module, layer: str) -> tuple[int, list, str, bool] | None:
    """``(dim, pieces, layout, bias)`` of the adapter tensors on ``layer`` that this rank
    cuts (dim 0: ``lora_B`` rows, dim 1: ``lora_A`` columns; no pieces: kept whole, only
    the kinds are checked; ``bias``: a ``lora_B`` bias is cut with the rows, else refused
    - HSDP fuses, and a fused LoRA bias would change the sharded base bias), or None
    where the layer is whole on every rank."""
    if (split := adapter_split(model, layer)) is not None:
        kind = "column" if split[0] == 0 else "row"
        return split[0], split[1], f"tensor parallelism ({kind}-parallel)", True
    base = model.get_submodule(layer)
    base = getattr(base, "base_layer", base)
    if not isinstance(getattr(base, "weight", None), DTensor):
        return None
    from peft.tuners.tuners_utils import _get_in_out_features

    rows = local_rows(base.weight)
    # peft sizes an adapter on a DTensor weight of a mesh not named "fsdp" to its local
    # rows (it takes the mesh for tensor parallelism): B then keeps those rows.
    local = rows is not None and _get_in_out_features(base)[1] == rows[2] != base.weight.shape[0]
    return 0, [rows] if local else [], "HSDP (row shards)", False


def _layer_name(key: str) -> str | None:
    for part in _LORA_PARTS:
        if part in key:
            return key.split(part)[0]
    m = re.match(r"^(.*)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2)(\.\w+)?$", key)
    if m:  # LoHa / LoKr (peft keys: <layer>.hada_w1_a.<adapter>)
        return m.group(1)
    return None


def _down(key: str) -> bool:
    return ".lora_A" in key or ".lora_down" in key


def _up(key: str) -> bool:
    return ".lora_B" in key or ".lora_up" in key


def _parameters(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
