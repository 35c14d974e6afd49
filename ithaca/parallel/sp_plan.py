"""Declarative sequence sharding: the ``_sp_plan`` types and their validation.

A model class declares where its sequence is split and gathered::

    class MyTransformer(nn.Module):
        _sp_plan = {
            "rope": {  # shard the RoPE module's (cos, sin) outputs
                0: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True),
                1: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True),
            },
            "blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
            "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
        }

Module keys: ``""`` the root, ``"blocks.0"`` one list element, ``"blocks.*"`` every
element, ``"rope"`` a submodule, ``"outputs.main"`` a ModuleDict entry. In a dict
value, string keys name forward parameters (inputs, ``split_output=False``) and
integer keys index the output tuple (``split_output=True`` or an output gather).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class SequenceParallelInput:
    """Split a tensor along ``split_dim`` across the sequence-parallel ranks."""

    split_dim: int
    expected_dims: int | None = None
    """Tensor rank to expect; a tensor of another rank is not split (a warning, and
    ``apply_sequence_parallel(strict=True)`` turns it into an error after the forward)."""
    split_output: bool = False
    """False: split the named forward input. True: split the module's output entry."""
    auto_pad: bool = False
    """Pad a length that does not divide by the world size; the padding is masked out
    of attention and trimmed at the gather."""


@dataclass(frozen=True)
class SequenceParallelOutput:
    """Gather a tensor along ``gather_dim`` from all sequence-parallel ranks."""

    gather_dim: int
    expected_dims: int | None = None


@dataclass(frozen=True)
class SequenceParallelPartialInput:
    """Split only the image part of a ``[text, image]`` tensor; the text stays whole.

    ``text_len_source`` is a forward parameter name (its ``shape[0]`` if a tensor, its
    value if an int) or a fixed text length. ``auto_pad`` (an extension of the
    reference API) pads the image part as :class:`SequenceParallelInput` does; without
    it the image part still follows a padding another spec of the same forward made.
    """

    split_dim: int
    text_len_source: str | int
    expected_dims: int | None = None
    split_output: bool = False
    auto_pad: bool = False


SequenceParallelInputType = SequenceParallelInput | SequenceParallelPartialInput
SequenceParallelOutputType = SequenceParallelOutput
SequenceParallelSpec = SequenceParallelInputType | SequenceParallelOutputType
SequenceParallelModelPlan = dict[
    str,
    SequenceParallelOutputType | dict[str | int, SequenceParallelSpec],
]

_INPUTS = (SequenceParallelInput, SequenceParallelPartialInput)


def get_sp_plan_from_model(model: nn.Module) -> SequenceParallelModelPlan | None:
    """The ``_sp_plan`` declared on the model (or its class), or None."""
    return getattr(model, "_sp_plan", None)


def _check_dims(where: str, dim: int, expected_dims: int | None) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ValueError(f"{where}: dimension ({dim!r}) must be an int")
    if expected_dims is None:
        return
    if not isinstance(expected_dims, int) or expected_dims < 1:
        raise ValueError(f"{where}: expected_dims ({expected_dims!r}) must be a positive int")
    if not -expected_dims <= dim < expected_dims:
        raise ValueError(f"{where}: dimension {dim} is out of range for a {expected_dims}-d tensor")


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise ValueError(f"_sp_plan module key ({key!r}) must be a string")
    parts = key.split(".") if key else []
    for i, part in enumerate(parts):
        if part == "":
            raise ValueError(f"_sp_plan module key ({key!r}) has an empty path component")
        if "*" in part and (part != "*" or i != len(parts) - 1 or i == 0):
            raise ValueError(
                f"_sp_plan module key ({key!r}): '*' may only stand as the last component "
                f"after a module list, as in 'blocks.*'"
            )


def _check_spec(where: str, key: str | int, spec) -> None:
    if isinstance(spec, _INPUTS):
        _check_dims(where, spec.split_dim, spec.expected_dims)
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ValueError(f"{where}: key ({key!r}) must be a parameter name or an output index")
        if isinstance(key, str) and spec.split_output:
            raise ValueError(
                f"{where}: split_output=True splits the module's outputs, so its key must be "
                f"an output index (int), not the parameter name {key!r}"
            )
        if isinstance(key, int) and not spec.split_output:
            raise ValueError(
                f"{where}: output index {key} needs split_output=True (a string key names "
                f"an input parameter)"
            )
        if isinstance(spec, SequenceParallelPartialInput):
            src = spec.text_len_source
            if (
                isinstance(src, bool)
                or not isinstance(src, str | int)
                or (isinstance(src, int) and src < 0)
            ):
                raise ValueError(
                    f"{where}: text_len_source ({src!r}) must be a parameter name or a "
                    f"non-negative int"
                )
    elif isinstance(spec, SequenceParallelOutput):
        _check_dims(where, spec.gather_dim, spec.expected_dims)
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(
                f"{where}: an output gather is keyed by output index (int), not {key!r}"
            )
    else:
        raise ValueError(f"{where}: {spec!r} is not a sequence-parallel spec")


def validate_sp_plan(plan: SequenceParallelModelPlan) -> None:
    """Raise ``ValueError`` describing the first malformed entry of ``plan``."""
    if not isinstance(plan, dict):
        raise ValueError(f"_sp_plan must be a dict, got {type(plan).__name__}")
    for module_key, value in plan.items():
        _check_key(module_key)
        where = f"_sp_plan[{module_key!r}]"
        if isinstance(value, SequenceParallelOutput):
            _check_dims(where, value.gather_dim, value.expected_dims)
            continue
        if not isinstance(value, dict) or not value:
            raise ValueError(
                f"{where} must be a SequenceParallelOutput or a non-empty dict of specs, "
                f"got {value!r}"
            )
        for key, spec in value.items():
            _check_spec(f"{where}[{key!r}]", key, spec)


def resolve_modules(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The modules a plan key names (``"blocks.*"`` names every element)."""
    if key.endswith(".*"):
        parent_name = key[:-2]
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, nn.ModuleList | nn.Sequential):
            raise ValueError(f"_sp_plan key {key!r}: {parent_name!r} is not a module list")
        return [(f"{parent_name}.{i}", m) for i, m in enumerate(parent)]
    try:
        return [(key, model.get_submodule(key))]
    except AttributeError as exc:
        raise ValueError(
            f"_sp_plan key {key!r} names no submodule of {type(model).__name__}"
        ) from exc


def check_parameter_names(module: nn.Module, module_key: str, names: list[str]) -> None:
    """Raise when a plan names a forward parameter the module does not take."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in names:
        if name not in params:
            raise ValueError(
                f"_sp_plan[{module_key!r}] names parameter {name!r}, but "
                f"{type(module).__name__}.forward takes {list(params)}"
            )
