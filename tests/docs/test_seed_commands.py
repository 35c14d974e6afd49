"""Every command line of the seed documents parses with ithaca's CLI (program name changed:
``vllm serve`` -> ``ithaca serve``, ``python .../text_to_image.py`` -> ``ithaca generate``),
and the underscore spellings work for every hyphenated flag.

Pyramid: argument parsing and config building only, no processes.
"""

from __future__ import annotations

import argparse

import pytest

from ithaca.cli import _parallel, build_parser
from ithaca.config import ParallelConfig
from tests.docs import seeds

# Command lines of the seeds that are not the reference system's CLI (shell, driver tools).
NOT_OURS = {"cd", "nvidia-smi"}


def _commands():
    if not seeds.available():
        return [
            pytest.param(None, None, marks=pytest.mark.skip(reason=f"no seeds at {seeds.SEEDS}"))
        ]
    return [pytest.param(key, argv, id=key) for key, argv in seeds.commands()]


def _flag(argv: list[str], *names: str, default: int = 1) -> int:
    for i, token in enumerate(argv):
        if token in names:
            return int(argv[i + 1])
    return default


@pytest.mark.parametrize("key,argv", _commands())
def test_seed_command_parses(key, argv):
    ours = seeds.to_ithaca(argv)
    if ours is None:
        assert argv[0] in NOT_OURS, f"{key}: a command of an unknown program: {argv}"
        return
    args = build_parser().parse_args(ours)
    config = _parallel(args)
    assert config == ParallelConfig(
        ulysses_degree=_flag(ours, "--usp", "--ulysses-degree", "--ulysses_degree"),
        ring_degree=_flag(ours, "--ring", "--ring-degree", "--ring_degree"),
        tensor_parallel_size=_flag(ours, "--tensor_parallel_size", "--tensor-parallel-size"),
    )
    if "--num_inference_steps" in ours:
        assert args.num_inference_steps == _flag(ours, "--num_inference_steps")
    if ours[0] == "serve":
        assert args.port == 8091 and args.omni


def _long_options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((name, sub, a, o) for a, o in _long_options_of(sub))


def _long_options_of(parser):
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and "-" in option[2:]:
                yield action, option


def test_every_hyphenated_flag_has_its_underscore_spelling():
    parser = build_parser()
    checked = 0
    for command, sub, action, option in _long_options(parser):
        alias = "--" + option[2:].replace("-", "_")
        assert sub._option_string_actions.get(alias) is action, (command, alias)
        checked += 1
    assert checked > 40  # serve, generate, calibrate-teacache, worker-node flags


def test_underscore_spellings_parse_to_the_same_values():
    hyphen = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "p",
            "--num-inference-steps",
            "7",
            "--ulysses-degree",
            "2",
            "--ring-degree",
            "2",
            "--true-cfg-scale",
            "3.5",
            "--negative-prompt",
            "n",
        ]
    )
    under = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "p",
            "--num_inference_steps",
            "7",
            "--ulysses_degree",
            "2",
            "--ring_degree",
            "2",
            "--true_cfg_scale",
            "3.5",
            "--negative_prompt",
            "n",
        ]
    )
    assert vars(hyphen) == vars(under)
    serve = build_parser().parse_args(
        ["serve", "--max_batch_size", "2", "--cfg_parallel_size", "2"]
    )
    assert (serve.max_batch_size, serve.cfg_parallel_size) == (2, 2)
