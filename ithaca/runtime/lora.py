"""LoRA adapters for every family, loaded by diffusers' and peft's own code.

A file is read by the family's diffusers pipeline class (its ``lora_state_dict``
converts kohya/ComfyUI, Lightning and other community layouts to diffusers keys) and
injected into the transformer by its ``load_lora_into_transformer`` (peft underneath);
a PEFT adapter folder (``adapter_config.json``: LoRA, LoHa, LoKr) goes through peft's
``inject_adapter_in_model`` + ``set_peft_model_state_dict``. Before anything is
injected, every key is checked against the transformer: a file that does not fit names
its first unmatched key and the model, and nothing is loaded.

:class:`LoraAdapters` is one pipeline's adapter table, the same on every rank (every
rank runs the same management commands in the same order): named adapters, at most
``max_resident`` of them in the transformer (least recently used evicted, reloaded
from their path on demand), and :meth:`LoraAdapters.apply`, which makes one adapter
set active before a loop:

- unfused (default): the adapters run beside the base layers, weighted per request;
- fused (``fuse=True``): the set is merged into the weights while consecutive loops
  use it; the touched base weights are kept and copied back when the set changes, so
  the base model is restored bit for bit (peft's unmerge subtracts, which rounds).
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ithaca.parallel.hsdp import local_rows
from ithaca.parallel.tensor import adapter_split, take
from ithaca.types import LoraRef, ParamError

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Adapter names: what a URL path segment and a peft adapter name both take."""
_LORA_PARTS = (".lora_A", ".lora_B", ".lora_down", ".lora_up", ".lora_magnitude_vector")


@dataclass
class _Adapter:
    name: str
    path: str
    scale: float
    resident: bool = False


class LoraAdapters:
    """The adapters of one pipeline (see the module docstring).

    Under HSDP (targets with FSDP2-sharded weights) an active set is always fused:
    each rank holds only its rows of ``lora_B`` and merges its rows of ``B A`` into its
    own weight shard (no collective; the kept rows are copied back on a change).

    ``targets`` maps a target name to a transformer (``{"transformer": t}``; Wan2.2's
    two experts: ``{"high_noise": t1, "low_noise": t2}``); every adapter is loaded into
    each, and a :class:`LoraRef` with ``expert`` set applies to that one only.
    ``rebind()`` is called after the transformers' modules change (peft wraps layers),
    so the sequence-parallel hooks follow them.
    """

    def __init__(self, family: str, loader: type | None, targets: dict[str, nn.Module],
                 rebind=None, max_resident: int | None = None):  # fmt: skip
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_loras ({max_resident}) must be at least 1")
        self.family = family
        self.loader = loader
        self.targets = targets
        self.rebind = rebind or (lambda: None)
        self.max_resident = max_resident
        self.adapters: OrderedDict[str, _Adapter] = OrderedDict()  # LRU order: oldest first
        self.active: tuple = ()
        self.fused: tuple = ()
        self._saved: dict[nn.Module, torch.Tensor] = {}
        self.sharded = any(
            isinstance(p, DTensor) for model in targets.values() for p in model.parameters()
        )
        """HSDP: adapters hold row shards and run fused only (:func:`split_for_layout`)."""

    # -- management (the same on every rank) -----------------------------------------
    def add(self, name: str, path: str, scale: float = 1.0) -> dict:
        """Register ``name`` and load it; raises ``ValueError`` (nothing loaded) when the
        name is taken or malformed or the file does not fit."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ParamError("name", f"LoRA name {name!r} must match {NAME.pattern}")
        if name in self.adapters:
            raise ParamError("name", f"a LoRA named {name!r} is already loaded")
        if not os.path.exists(path):
            raise ParamError("path", f"LoRA file {path!r} does not exist")
        adapter = _Adapter(name, path, float(scale))
        self._deactivate()
        self._load(adapter)
        self.adapters[name] = adapter
        return self.describe(adapter)

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise ParamError("name", f"no LoRA named {name!r}")
        self._deactivate()
        adapter = self.adapters.pop(name)
        if adapter.resident:
            self._unload(adapter)

    def listing(self) -> list[dict]:
        return [self.describe(self.adapters[n]) for n in sorted(self.adapters)]

    def describe(self, adapter: _Adapter) -> dict:
        return {"name": adapter.name, "path": adapter.path, "scale": adapter.scale,
                "resident": adapter.resident}  # fmt: skip

    # -- per request ---------------------------------------------------------------------
    def resolve(self, refs) -> tuple[LoraRef, ...]:
        """A request's ``lora`` checked against the table: unknown names, bad scales and
        experts raise :class:`ParamError` ``lora``; a missing scale is the adapter's."""
        out = []
        for ref in refs or ():
            if ref.name not in self.adapters:
                known = ", ".join(self.adapters) or "none loaded"
                raise ParamError("lora", f"unknown LoRA {ref.name!r} (known: {known})")
            if ref.expert is not None and ref.expert not in self.targets:
                raise ParamError(
                    "lora",
                    f"LoRA expert {ref.expert!r}: {self.family} has {sorted(self.targets)}",
                )
            scale = self.adapters[ref.name].scale if ref.scale is None else ref.scale
            if not isinstance(scale, int | float) or isinstance(scale, bool) or scale != scale:
                raise ParamError("lora", f"LoRA scale ({scale!r}) must be a number")
            out.append(LoraRef(ref.name, float(scale), ref.expert))
        return tuple(out)

    def apply(self, refs: tuple[LoraRef, ...], fuse: bool = False) -> None:
        """Make ``refs`` (resolved) the active set on every target; ``()``: the base model."""
        fuse = fuse or self.sharded
        if refs == self.active and bool(self.fused) == (fuse and bool(refs)):
            return
        self._deactivate()
        for ref in refs:  # reload evicted adapters (LRU), most recently used last
            self.adapters.move_to_end(ref.name)
            if not self.adapters[ref.name].resident:
                self._load(self.adapters[ref.name], keep={r.name for r in refs})
        for target, model in self.targets.items():
            names = [r.name for r in refs if r.expert in (None, target)]
            scales = [r.scale for r in refs if r.expert in (None, target)]
            if names:
                model.enable_lora()
                model.set_adapters(names, scales)
        self.active = refs
        if fuse and refs:
            self._fuse()

    def _deactivate(self) -> None:
        self._unfuse()
        for model in self.targets.values():
            if getattr(model, "peft_config", None):
                model.disable_lora()
        self.active = ()

    # -- fusing --------------------------------------------------------------------------
    @torch.no_grad()
    def _fuse(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in self.targets.values():
            _reshard(model)
        for target, model in self.targets.items():
            names = [r.name for r in self.active if r.expert in (None, target)]
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    held = getattr(module, module.adapter_layer_names[0])  # lora_A, hada_w1_a..
                    used = [n for n in names if n in module.active_adapters and n in held]
                    if not used:
                        continue
                    base = module.get_base_layer()
                    if isinstance(base.weight, DTensor):  # HSDP: this rank's rows only
                        _merge_rows(module, used, self._saved)
                        continue
                    self._saved[base] = base.weight.detach().clone()
                    module.merge(adapter_names=used)  # TP: the local B A slice, shard shape
        self.fused = self.active

    @torch.no_grad()
    def _unfuse(self) -> None:
        """Copy the kept base weights back (bit for bit) and mark nothing merged."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not self.fused:
            return
        for model in self.targets.values():
            _reshard(model)
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and module.merged_adapters:
                    base = module.get_base_layer()
                    _local(base.weight).copy_(self._saved.pop(base))
                    module.merged_adapters.clear()
        assert not self._saved, "a fused layer was not restored"
        self.fused = ()

    # -- loading -------------------------------------------------------------------------
    def _load(self, adapter: _Adapter, keep: set[str] = frozenset()) -> None:
        if self.max_resident is not None:
            resident = [a for a in self.adapters.values() if a.resident and a.name not in keep]
            while resident and len(resident) + len(keep) >= self.max_resident:
                self._unload(resident.pop(0))  # least recently used first
        loaded = []
        try:
            for model in self.targets.values():
                load_adapter(self.loader, model, adapter.name, adapter.path, self.family)
                loaded.append(model)
        except Exception:
            for model in loaded:  # nothing loaded half
                model.delete_adapters(adapter.name)
            self._rebind()
            raise
        adapter.resident = True
        self._rebind()
        for model in self.targets.values():  # peft activates what it loads: not yet
            model.disable_lora()

    def _rebind(self) -> None:
        """peft wrapped layers: the sequence-parallel hooks (``rebind``) and the tensor-
        parallel all-reduces follow the wrappers."""
        for model in self.targets.values():
            if getattr(model, "_ithaca_tp", None) is not None:
                model._ithaca_tp.rebind(model)
        self.rebind()

    def _unload(self, adapter: _Adapter) -> None:
        for model in self.targets.values():
            model.delete_adapters(adapter.name)
        adapter.resident = False


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


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``weight`` (a DTensor's local shard, in place)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight.data


def _reshard(model: nn.Module) -> None:
    """Free every HSDP block's gathered weights (local, no collective), so the next
    forward all-gathers what a merge or unmerge wrote into the shards (a block kept
    gathered, ``reshard_after_forward=False``, would run the stale copy)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _merge_rows(module: nn.Module, names: list[str], saved: dict) -> None:
    """Fuse ``names`` into an HSDP-sharded layer: this rank's rows of each ``B A``
    (peft's ``get_delta_weight``, the same sum one rank adds) into its own shard, in
    peft's order; the shard's rows are kept in ``saved`` for a bit-exact unfuse. No
    collective: every rank already holds the whole (small) adapter."""
    base = module.get_base_layer()
    local = base.weight.to_local()
    saved[base] = local.detach().clone()
    rows = local_rows(base.weight)
    for name in names:
        assert name not in getattr(module, "lora_variant", {}), name  # refused at load
        delta = module.get_delta_weight(name)  # B holds this rank's rows: (rows, in)
        if delta.shape != local.shape and rows is not None:  # a whole B: (out, in) -> rows
            delta = delta.narrow(rows[0], rows[1], rows[2])
        local += delta.to(local.dtype)
    module.merged_adapters.extend(names)


def adapter_summary(refs: tuple[LoraRef, ...]) -> list[dict]:
    """What a response's metadata says was applied."""
    return [
        {"name": r.name, "scale": r.scale, **({"expert": r.expert} if r.expert else {})}
        for r in refs
    ]


__all__ = ["LoraAdapters", "adapter_summary", "check_fits", "load_adapter"]
