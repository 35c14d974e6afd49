"""The engine replays its LoRA adapter table into a worker group that (re)starts, before
the group serves: adapters POSTed since start are loaded, ``--lora`` ones DELETEd since
are unloaded, one whose file is gone is dropped from the table (and from the other
groups) instead of failing the restart forever. A command while a group restarts goes
to the ready groups only (the restarting one gets it by the replay). In process, with
an executor double that keeps an adapter table like the workers do."""

from __future__ import annotations

import pytest

from ithaca.engine.engine import Engine
from ithaca.engine.errors import EngineDeadError, GenerationFailedError
from ithaca.types import GenerationParams, LoraCommand, LoraRef


class TableExecutor:
    """Starts with its spec's adapters, runs management commands like a worker group."""

    def __init__(self, name: str, preload: tuple = (), missing: tuple = ()):
        self.name = name
        self.preload = preload
        self.missing = set(missing)
        self.table: dict[str, dict] = {}
        self.commands: list[tuple[str, str]] = []
        self.alive = False

    @property
    def spec(self):
        return type("Spec", (), {"loras": self.preload})

    def start(self) -> None:
        self.table = {n: {"name": n, "path": p, "scale": s} for n, p, s in self.preload}
        self.commands.clear()
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def manage_lora(self, command: LoraCommand) -> list[dict]:
        self.commands.append((command.op, command.name))
        if command.op == "load":
            if command.path in self.missing:
                raise GenerationFailedError(f"no file {command.path}", "invalid_request")
            self.table[command.name] = {"name": command.name, "path": command.path,
                                        "scale": command.scale}  # fmt: skip
        elif command.op == "unload":
            self.table.pop(command.name)
        return [self.table[n] for n in sorted(self.table)]

    def validate(self, params: GenerationParams) -> dict:
        for ref in params.lora:
            if ref.name not in self.table:
                raise GenerationFailedError(f"unknown LoRA {ref.name!r} ({self.name})", "bad")
        return {"width": 64, "height": 64, "steps": 2}


def test_a_restarted_group_gets_the_table_replayed_before_it_serves():
    groups = [TableExecutor("g0", preload=(("A", "/a", 0.8),)),
              TableExecutor("g1", preload=(("A", "/a", 0.8),))]  # fmt: skip
    engine = Engine(groups)
    engine.loras = {"A": {"name": "A", "path": "/a", "scale": 0.8}}
    for i in range(2):
        assert engine._start_executor(i, first=True)
    assert groups[0].commands == [("list", "")]  # nothing to change at the first start
    engine.manage_lora(LoraCommand("load", "B", "/b", 0.5))
    engine.manage_lora(LoraCommand("unload", "A"))
    assert all(set(g.table) == {"B"} for g in groups)

    groups[0].alive = False
    engine._ready[0].clear()  # what the dispatcher does when it sees the group dead
    engine.manage_lora(LoraCommand("load", "C", "/c", 1.0))  # only the ready group 1
    assert "C" not in groups[0].table and "C" in groups[1].table
    assert engine._start_executor(0, first=False)  # restarts with --lora's A only
    assert groups[0].table == groups[1].table
    assert sorted(groups[0].commands[1:]) == [("load", "B"), ("load", "C"), ("unload", "A")]
    assert engine._ready[0].is_set()


def test_requests_are_validated_on_a_ready_group_not_one_still_replaying():
    """A restarted group is alive before its table is replayed: a request naming a
    POSTed adapter must not be checked there (it would be a 400 for a valid request)."""
    groups = [TableExecutor("g0"), TableExecutor("g1")]
    engine = Engine(groups)
    for i in range(2):
        assert engine._start_executor(i, first=True)
    engine.manage_lora(LoraCommand("load", "B", "/b", 0.5))
    groups[0].alive = False
    engine._ready[0].clear()
    groups[0].start()  # alive again, the replay of B not done yet (not ready)
    params = GenerationParams(prompt="p", lora=(LoraRef("B"),))
    assert engine.validate(params)["steps"] == 2  # group 1's answer
    groups[1].alive = False
    engine._ready[1].clear()
    with pytest.raises(EngineDeadError):  # 503 "restarting", never "unknown LoRA"
        engine.validate(params)


def test_an_adapter_whose_file_is_gone_is_dropped_not_retried():
    groups = [TableExecutor("g0", missing=("/b",)), TableExecutor("g1")]
    engine = Engine(groups)
    for i in range(2):
        assert engine._start_executor(i, first=True)
    groups[0].missing.clear()
    engine.manage_lora(LoraCommand("load", "B", "/b", 1.0))
    groups[0].missing.add("/b")  # the file is deleted, then group 0 restarts
    groups[0].alive = False
    engine._ready[0].clear()
    assert engine._start_executor(0, first=False)
    assert "B" not in engine.loras
    assert groups[0].table == groups[1].table == {}


def test_lora_flags_reach_every_rank_and_the_right_model():
    """``--lora-fuse auto`` reaches each rank's spec (and the pipeline); ``--lora
    NAME=PATH[:SCALE]@MODEL`` goes to the model it names, without ``@`` to the first."""
    from ithaca.cli import _assign_loras, build_parser, parse_model
    from ithaca.config import ParallelConfig, ServerConfig
    from ithaca.engine.engine import build_engine
    from ithaca.engine.executor import PipelineSpec, spec_from_json, spec_to_json

    args = build_parser().parse_args(["serve", "a", "--lora-fuse", "auto"])
    assert args.lora_fuse == "auto"
    for flag in (False, True):
        spec, _ = spec_from_json(spec_to_json(PipelineSpec(fuse_loras=flag), 1.0))
        assert spec.fuse_loras is flag
    engine = build_engine(ServerConfig(model="m", executor="inprocess", lora_fuse="auto"),
                          ParallelConfig())  # fmt: skip
    assert engine.executors[0].spec.fuse_loras
    with pytest.raises(ValueError, match=r"lora_fuse \('always'\)"):
        ServerConfig(lora_fuse="always")
    default = ParallelConfig()
    entries = [parse_model("/ckpt/flux@name=flux", default), parse_model("/ckpt/wan", default)]
    texts = ["a=/l/a@b.safetensors:0.5", "w=/l/w.safetensors@/ckpt/wan", "s=/l/s:2@flux"]
    flux, wan = _assign_loras(entries, texts)
    assert flux.loras == (("a", "/l/a@b.safetensors", 0.5), ("s", "/l/s", 2.0))
    assert wan.loras == (("w", "/l/w.safetensors", 1.0),)
