"""``ParallelConfig.auto`` / ``--usp auto``: the layouts the guide's cost model picks.

Pyramid: pure planning, no processes. The table is the one in docs/guide.md
("What --usp auto picks"); a change to the cost model must change both.
"""

from __future__ import annotations

import json

import pytest

from ithaca.autolayout import ModelGeometry, layer_seconds, model_geometry, plan
from ithaca.cli import _parallel, build_parser
from ithaca.config import ParallelConfig

QWEN = ModelGeometry(heads=24, head_dim=128)  # Qwen-Image's transformer: 24 x 128

# (GPUs, side px, true CFG, interconnect) -> (ulysses, ring, cfg, dp)
CASES = [
    (2, 512, False, "nvlink", (1, 1, 1, 2)),  # small image: one GPU per request
    (2, 1024, False, "nvlink", (2, 1, 1, 1)),
    (4, 1024, False, "nvlink", (2, 1, 1, 2)),  # 1024 px: degree 2 at most
    (2, 2048, False, "nvlink", (2, 1, 1, 1)),
    (4, 2048, False, "nvlink", (4, 1, 1, 1)),
    (8, 2048, False, "nvlink", (8, 1, 1, 1)),
    (2, 2048, False, "pcie", (1, 2, 1, 1)),  # PCIe: Ring
    (8, 2048, False, "pcie", (1, 8, 1, 1)),
    (2, 1024, True, "nvlink", (1, 1, 2, 1)),  # true CFG: CFG-parallel first
    (8, 2048, True, "nvlink", (4, 1, 2, 1)),
    (4, 2048, True, "pcie", (1, 2, 2, 1)),
    (16, 4096, False, "nvlink", (8, 2, 1, 1)),  # 24 heads cap Ulysses at 8: hybrid
    (16, 4096, True, "nvlink", (8, 1, 2, 1)),
]


@pytest.mark.parametrize("world,side,cfg,link,expected", CASES)
def test_auto_picks_what_the_guide_says(world, side, cfg, link, expected):
    config = ParallelConfig.auto(world, QWEN, (side, side), cfg=cfg, interconnect=link)
    got = (
        config.ulysses_degree,
        config.ring_degree,
        config.cfg_parallel_size,
        config.data_parallel_size,
    )
    assert got == expected
    assert config.world_size == world


def test_the_reason_names_the_choice_and_the_estimate():
    chosen = plan(8, QWEN, (2048, 2048), interconnect="nvlink")
    assert "ulysses=8 ring=1 cfg=1 dp=1" in chosen.reason
    assert "16384 image tokens" in chosen.reason and "nvlink (given)" in chosen.reason
    single = layer_seconds(16384, QWEN, 1, 1, 1, "nvlink")
    assert chosen.table[0].seconds < single / 6  # 8 ranks, Ulysses traffic on NVLink


def test_cost_model_bytes_match_the_benchmark_formulas():
    # With infinite compute the layer time is the traffic: Ulysses 4*S*d/P*(P-1)/P.
    from ithaca.autolayout import Hardware

    hw = Hardware(flops=1e30, latency_s=0.0, nvlink_bandwidth=1.0)
    s, d = 4096, QWEN.heads * QWEN.head_dim * 2
    assert layer_seconds(s, QWEN, 4, 1, 1, "nvlink", hw) == pytest.approx(4 * s * d / 4 * 3 / 4)
    # Ring 2*S*d*(P-1)/P, half of it hidden at most (no compute to hide behind here)
    assert layer_seconds(s, QWEN, 1, 4, 1, "nvlink", hw) == pytest.approx(2 * s * d * 3 / 4)


def test_heads_come_from_the_checkpoint(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"num_attention_heads": 6, "attention_head_dim": 64, "patch_size": 2})
    )
    assert model_geometry(str(tmp_path)) == ModelGeometry(6, 64, 16)
    config = ParallelConfig.auto(4, str(tmp_path), (2048, 2048), interconnect="nvlink")
    assert 6 % config.ulysses_degree == 0 and config.world_size == 4


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match=r"world_size \(0\)"):
        plan(0, QWEN, (1024, 1024))
    with pytest.raises(ValueError, match="interconnect"):
        plan(2, QWEN, (1024, 1024), interconnect="infiniband")


def test_cli_usp_auto(tmp_path, capsys):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"num_attention_heads": 24, "attention_head_dim": 128})
    )
    argv = ["serve", str(tmp_path), "--usp", "auto", "--world-size", "8"]
    args = build_parser().parse_args([*argv, "--interconnect", "nvlink"])
    config = _parallel(args)  # checkpoint without defaults: 1024x1024
    assert (config.ulysses_degree, config.ring_degree) == (2, 1)
    assert config.data_parallel_size == 4
    assert "--usp auto:" in capsys.readouterr().err
    args = build_parser().parse_args([*argv, "--interconnect", "nvlink", "--ring", "2"])
    with pytest.raises(ValueError, match="--usp auto chooses the ring"):
        _parallel(args)
    gen = build_parser().parse_args(
        f"generate --model {tmp_path} --prompt x --usp auto --world-size 8 --interconnect nvlink "
        "--width 2048 --height 2048 --true-cfg-scale 4 --negative-prompt=".split()
    )
    assert _parallel(gen) == ParallelConfig(ulysses_degree=4, cfg_parallel_size=2)


def test_interconnect_detection_reads_nvidia_smi(monkeypatch):
    import subprocess

    from ithaca import autolayout as auto

    nvlink = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV18\t0-63\nGPU1\tNV18\t X \t0-63\n"
    pcie = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tSYS\t0-63\nGPU1\tSYS\t X \t0-63\n"
    monkeypatch.setattr(auto.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    for text, expected in ((nvlink, "nvlink"), (pcie, "pcie"), ("No devices\n", None)):
        done = subprocess.CompletedProcess([], 0, stdout=text, stderr="")
        monkeypatch.setattr(auto.subprocess, "run", lambda *a, done=done, **k: done)
        assert auto.detect_interconnect() == expected
    monkeypatch.setattr(auto.shutil, "which", lambda name: None)
    assert auto.detect_interconnect() is None  # no nvidia-smi and no GPUs here
    assert "pcie (assumed: nothing to detect it from)" in plan(2, QWEN, (2048, 2048)).reason
