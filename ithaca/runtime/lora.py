"""LoRA adapters for every family: one pipeline's adapter table and its LoRA commands.

Adapter files are read, checked and injected by diffusers' and peft's own code
(:mod:`ithaca.runtime.lora_files`). :class:`LoraAdapters` is one pipeline's adapter
table, the same on every rank (every rank runs the same management commands in the same
order): named adapters, at most ``max_resident`` of them in the transformer (least
recently used evicted, reloaded from their path on demand), and
:meth:`LoraAdapters.apply`, which makes one adapter set active before a loop:

- unfused (default): the adapters run beside the base layers, weighted per request;
- fused (``fuse=True``): the set is merged into the weights while consecutive loops
  use it; the touched base weights are kept and copied back when the set changes, so
  the base model is restored bit for bit (peft's unmerge subtracts, which rounds).

:class:`LoraHost` is the pipeline's side (the denoising loop derives from it): the table
created on first use, the engine's management commands, a request's ``lora`` resolved
against the table and the set applied before each loop.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ithaca.parallel.hsdp import local_rows
from ithaca.runtime.lora_files import load_adapter
from ithaca.types import GenerationParams, LoraCommand, LoraRef, ParamError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Adapter names: what a URL path segment and a peft adapter name both take."""


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


class LoraHost:
    """A pipeline's LoRA side (see the module docstring). The model layer declares, where
    its family differs from the defaults here, ``lora_targets()``, ``lora_loader()`` and
    ``lora_fusable()``."""

    fuse_loras: bool = False
    """Merge the active adapter set into the weights while consecutive loops use it
    (faster steps); off: adapters run beside the base layers. Either way the base
    weights come back bit for bit when the set changes."""
    max_loras: int | None = None
    """At most this many adapters resident in the transformer (LRU); None: no bound."""
    loras: LoraAdapters | None = None
    """The adapter table (:meth:`lora_table`), created on first use."""

    def lora_targets(self) -> dict[str, nn.Module]:
        """The transformers an adapter is loaded into, by the name a request's
        ``expert`` uses (Wan2.2: ``high_noise`` / ``low_noise``)."""
        return {"transformer": self.transformer}

    def lora_loader(self):
        """The diffusers pipeline class whose LoRA converters read this family's files
        (None: files in the diffusers/PEFT key layout only)."""
        return None

    def lora_fusable(self) -> bool:
        """Whether ``fuse_loras`` may merge adapters into the weights (not where weights
        are swapped in from host copies, which would drop the merge)."""
        return True

    def lora_table(self) -> LoraAdapters:
        if self.loras is None:
            runtimes = [r for r in (getattr(self, "runtimes", None) or [self.runtime]) if r]
            name = getattr(getattr(self, "spec", None), "name", type(self).__name__)

            def rebind() -> None:  # peft wrapped layers: hooks and caches follow
                for runtime in runtimes:
                    runtime.rebind()
                self.install_cache(None)

            self.loras = LoraAdapters(name, self.lora_loader(), self.lora_targets(), rebind,
                                      self.max_loras)  # fmt: skip
        return self.loras

    def load_lora(self, name: str, path: str, scale: float = 1.0) -> dict:
        """Add a named adapter (every rank of the group runs this, in the same order)."""
        return self.lora_table().add(name, path, scale)

    def unload_lora(self, name: str) -> None:
        self.lora_table().remove(name)

    def list_loras(self) -> list[dict]:
        return self.loras.listing() if self.loras is not None else []

    def manage_lora(self, command: LoraCommand) -> list[dict]:
        """Run one management command (the engine sends it to every rank); returns the
        adapter table afterwards."""
        if command.op == "load":
            self.load_lora(command.name, command.path, command.scale)
        elif command.op == "unload":
            self.unload_lora(command.name)
        elif command.op != "list":
            raise ValueError(f"LoRA command {command.op!r} must be load, unload or list")
        return self.list_loras()

    def resolve_lora(self, params: GenerationParams) -> tuple:
        """``params.lora`` checked against the loaded adapters (``Request.lora``; a family's
        ``resolve`` calls it, so a LoRA request is known before it can join a batch)."""
        if not params.lora:
            return ()
        if self.loras is None:
            raise ParamError("lora", f"unknown LoRA {params.lora[0].name!r} (none loaded)")
        return self.loras.resolve(params.lora)

    def apply_loras(self, refs: tuple) -> None:
        """Make ``refs`` the active set (``()``: the base model) before a loop's first
        forward, on every rank. Not fused when the transformer is offloaded: a merge into
        a device copy would be dropped at eviction (the host buffer keeps the base weights)."""
        if self.loras is not None:
            fusable = self.lora_fusable() and not self.offloading.transformer_on_host
            self.loras.apply(refs, fuse=self.fuse_loras and fusable)


__all__ = ["LoraAdapters", "LoraHost", "adapter_summary"]
