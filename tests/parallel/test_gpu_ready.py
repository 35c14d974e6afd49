"""What a CUDA/NCCL run depends on, shown on CPU (issue 14).

Pyramid: kernel choice, group layout, device guard and device selection in-process
(probes patched: CUDA "available", GPU capability, installed packages); 2-rank gloo
for what needs a group (distinct communicators, no mask traffic or masked kernel for
padding, no host sync per layer, set_device). What only a GPU can show runs in
tests/parallel/test_gpu.py and scripts/gpu-check.
"""

import contextlib

import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.parallel import comm, kernels
from ithaca.parallel import state as state_mod
from ithaca.parallel.state import Axis, CommStats, ParallelState
from ithaca.testing.distributed import parallel_state

CUDA = torch.device("cuda", 0)


# -- kernel choice ------------------------------------------------------------------
@pytest.fixture
def gpu(monkeypatch):
    """Patch the probes: ``gpu(capability, flash=None|2|3|(2, 3), sage=False)``."""

    def set_(capability=(9, 0), flash=None, sage=False):
        versions = () if flash is None else (flash,) if isinstance(flash, int) else flash
        monkeypatch.setattr(kernels, "cuda_capability", lambda device: capability)
        monkeypatch.setattr(kernels, "flash_attn_versions", lambda: versions)
        monkeypatch.setattr(kernels, "sage_available", lambda: sage)

    return set_


def pick(backend="auto", dtype=torch.bfloat16, need_lse=False, masked=False, device=CUDA):
    return kernels.select_kernel(backend, device, dtype, need_lse=need_lse, masked=masked)


def test_auto_uses_the_lse_kernel_only_for_ring(gpu):
    gpu((9, 0), flash=None)
    assert pick(need_lse=False) == "sdpa"  # local and Ulysses: torch picks flash/cuDNN
    assert pick(need_lse=True) == "torch_flash"  # Ring: a kernel that returns the lse
    assert pick(need_lse=True, masked=True) == "efficient"
    assert pick(need_lse=False, masked=True) == "sdpa"
    assert pick(need_lse=True, dtype=torch.float32) == "efficient"  # flash needs half
    gpu((7, 5), flash=None)  # Turing: no flash kernel at all
    assert pick(need_lse=True) == "efficient"


def test_auto_prefers_installed_flash_attn_matching_the_architecture(gpu):
    gpu((9, 0), flash=3)
    assert pick() == "flash3" and pick(need_lse=True) == "flash3"
    gpu((8, 0), flash=3)  # flash-attn 3 is Hopper-only
    assert pick(need_lse=True) == "torch_flash"
    gpu((8, 6), flash=2)
    assert pick() == "flash2" and pick(masked=True) == "sdpa"
    gpu((7, 5), flash=2)  # pre-Ampere: falls back, never raises
    assert pick() == "sdpa"
    gpu((8, 0), flash=(2, 3))  # both installed: Ampere takes 2, Hopper 3
    assert pick(need_lse=True) == "flash2"
    gpu((9, 0), flash=(2, 3))
    assert pick(need_lse=True) == "flash3"


def test_explicit_backends_fall_back_with_a_warning_instead_of_raising(gpu, caplog):
    gpu((7, 0), flash=2, sage=True)
    kernels._warned.clear()
    with caplog.at_level("WARNING", logger="ithaca.parallel.kernels"):
        assert pick("flash", need_lse=True) == "efficient"
        assert pick("flash", need_lse=True) == "efficient"
    assert len(caplog.records) == 1 and "compute capability >= 8.0" in caplog.text
    gpu((9, 0), flash=2, sage=True)
    assert pick("flash") == "flash2"
    assert pick("sage") == "sage"
    assert pick("sage", need_lse=True) == "flash2"  # Sage returns no lse
    assert pick("sdpa", need_lse=True) == "flash2"
    assert pick("cudnn") == "cudnn" and pick("cudnn", masked=True) == "sdpa"
    assert pick("efficient", masked=True) == "efficient"
    gpu((9, 0), flash=None, sage=False)
    assert pick("sage") == "sdpa"  # not installed
    assert pick("auto", device=torch.device("cpu")) == "cpu"


def test_sage_is_never_chosen_by_auto(gpu):
    gpu((9, 0), flash=None, sage=True)
    assert pick() == "sdpa"


def test_attention_backend_is_validated():
    with pytest.raises(ValueError, match=r"attention_backend \('xformers'\) must be one of"):
        ParallelConfig(attention_backend="xformers")
    with pytest.raises(ValueError, match=r"collective_timeout_s \(0\) must be > 0"):
        ParallelConfig(collective_timeout_s=0)


# -- groups -------------------------------------------------------------------------
def _count_groups(monkeypatch, config: ParallelConfig) -> tuple[dict, list]:
    made = []

    def fake_new_group(ranks, timeout=None):
        made.append((tuple(ranks), timeout))
        return object()

    monkeypatch.setattr(state_mod.dist, "new_group", fake_new_group)
    axes, _ = state_mod._create_groups(config, 0, torch.device("cpu"), CommStats())
    return axes, made


@pytest.mark.parametrize(
    "layout,groups",
    [
        # ulysses 8: ulysses, sp and replica are all 0..7 -> one communicator, not three
        (dict(ulysses_degree=8), 1),
        (dict(ring_degree=8), 1),
        (dict(ulysses_degree=4, cfg_parallel_size=2), 2 + 4 + 1),  # ulysses=sp, cfg, replica
        (dict(ulysses_degree=2, ring_degree=2, cfg_parallel_size=2), 4 + 4 + 2 + 4 + 1),
        (dict(ulysses_degree=4, data_parallel_size=2), 2 + 4),  # ulysses=sp=replica, dp
    ],
)
def test_one_group_per_distinct_member_list(monkeypatch, layout, groups):
    config = ParallelConfig(**layout, collective_timeout_s=7.5)
    axes, made = _count_groups(monkeypatch, config)
    members = [m for m, _ in made]
    assert len(members) == len(set(members)) == groups
    assert all(t.total_seconds() == 7.5 for _, t in made)
    # every multi-rank axis got the group created for its member list
    for axis in axes.values():
        assert (axis.group is None) == (axis.size == 1)


def test_collectives_reject_a_tensor_on_another_device_naming_the_call():
    axis = Axis("ulysses", (0, 1), 0, None, CommStats(), CUDA)
    x = torch.zeros(2, 4, 2, 3)
    with pytest.raises(RuntimeError, match=r"comm\.seq_to_heads over the ulysses group.*on cpu"):
        comm.seq_to_heads(x, axis)
    with pytest.raises(RuntimeError, match=r"comm\.all_gather"):
        comm.all_gather(x, axis, dim=1)
    with pytest.raises(RuntimeError, match=r"comm\.all_reduce"):
        comm.all_reduce(x, axis)
    with pytest.raises(RuntimeError, match=r"comm\.broadcast"):
        comm.broadcast(x, axis)


def _groups_on_ranks(config: ParallelConfig):
    """On every rank: build with a CUDA device (set_device patched), report the groups."""
    calls = []
    original = torch.cuda.set_device
    torch.cuda.set_device = calls.append
    try:
        state = ParallelState.build(config, device=f"cuda:{torch.distributed.get_rank()}")
    finally:
        torch.cuda.set_device = original
    try:
        shared = state.ulysses.group is state.sp.group is state.replica.group
        try:
            comm.all_reduce(torch.ones(1), state.replica)
            guard = "no error"
        except RuntimeError as exc:
            guard = str(exc)
        return [str(d) for d in calls], shared, len(state._owned), guard
    finally:
        state.destroy()


def test_build_sets_the_device_and_shares_one_group_on_two_ranks(worker_pool):
    results = worker_pool(2).run(_groups_on_ranks, ParallelConfig(ulysses_degree=2))
    for rank, (calls, shared, owned, guard) in enumerate(results):
        assert calls == [f"cuda:{rank}"]
        assert shared and owned == 1
        assert "comm.all_reduce over the replica group" in guard and "cuda" in guard


# -- device of the offline API ----------------------------------------------------------
def test_offline_executor_runs_on_the_gpu_when_cuda_is_available(monkeypatch):
    from ithaca.engine import executor as executor_mod
    from ithaca.engine.executor import InProcessExecutor, PipelineSpec

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        executor_mod, "load_pipeline", lambda spec, state: seen.setdefault("state", state)
    )
    InProcessExecutor(PipelineSpec("some/model")).start()
    assert seen["state"].device == torch.device("cuda", 0)
    from ithaca.models.registry import default_dtype

    assert default_dtype(seen["state"].device) == torch.bfloat16


# -- padding, masks and host syncs in parallel attention ---------------------------------
class _Padding:
    def __init__(self, padded: int, valid: int):
        self.padded, self.valid = padded, valid

    def valid_length(self, global_len):
        return self.valid if global_len == self.padded else None


@contextlib.contextmanager
def _count_host_syncs():
    """Count Tensor.item / bool / int / float / tolist calls (each is a device sync)."""
    counts = {"n": 0}
    names = ("item", "__bool__", "__int__", "__float__", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(fn):
        def counted(self, *a, **k):
            counts["n"] += 1
            return fn(self, *a, **k)

        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(saved[n]))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def _padded_attention(layout: dict, valid: int, padded: int):
    """Every rank: attention over a padded sequence; which kernels saw a mask and how
    many keys, the collectives made, host syncs on the second layer, the output error."""
    from ithaca.parallel import attention as attention_mod
    from ithaca.parallel import ring as ring_mod
    from ithaca.parallel.attention import ParallelAttention
    from ithaca.parallel.kernels import reference_attention

    calls = []
    real = kernels.local_attention

    def spy(q, k, v, key_mask=None, scale=None, **kw):
        calls.append((key_mask is not None, k.shape[1]))
        return real(q, k, v, key_mask, scale, **kw)

    attention_mod.local_attention = ring_mod.local_attention = spy
    try:
        with parallel_state(ParallelConfig(**layout)) as state:
            g = torch.Generator().manual_seed(0)
            b, h, d, t = 1, 4, 8, 5
            full = [torch.randn(b, padded, h, d, generator=g) for _ in range(3)]
            text = [torch.randn(b, t, h, d, generator=g) for _ in range(3)]
            text_mask = torch.ones(b, t, dtype=torch.bool)  # all True: dropped, once
            local = padded // state.sp.size
            mine = [x[:, state.sp.rank * local : (state.sp.rank + 1) * local] for x in full]
            attn = ParallelAttention(state, padding=_Padding(padded, valid))
            kw = dict(joint_q=text[0], joint_k=text[1], joint_v=text[2], joint_mask=text_mask)
            attn(*mine, **kw)  # first layer: decides once that the text mask is trivial
            calls.clear()
            state.stats.reset()
            with _count_host_syncs() as syncs:
                out, joint_out = attn(*mine, **kw)  # a later layer
            ref, _ = reference_attention(
                *(torch.cat([jt, x[:, :valid]], dim=1) for jt, x in zip(text, full, strict=True))
            )
            want = ref[:, t:][:, state.sp.rank * local : (state.sp.rank + 1) * local]
            n = max(0, min(local, valid - state.sp.rank * local))  # this rank's real tokens
            err = max(
                (out[:, :n] - want[:, :n]).abs().max().item(),
                (joint_out - ref[:, :t]).abs().max().item(),
            )
            return calls, dict(state.stats.calls), syncs["n"], err
    finally:
        attention_mod.local_attention = ring_mod.local_attention = real


@pytest.mark.parametrize("layout", [dict(ulysses_degree=2), dict(ring_degree=2)])
def test_padding_is_sliced_off_without_masks_mask_traffic_or_host_syncs(worker_pool, layout):
    valid, padded = 13, 16  # 13 tokens padded to 16 over 2 ranks: rank 1 holds 3 pads
    results = worker_pool(2).run(_padded_attention, layout, valid, padded)
    for calls, collectives, syncs, err in results:
        assert err <= 1e-5
        assert syncs == 0
        assert not any(masked for masked, _ in calls), calls  # no kernel call is masked
        if "ulysses_degree" in layout:
            # one all-to-all in, one back; the only all_gather is the text output's heads
            assert collectives == {"all_to_all": 2, "all_gather": 1}, collectives
            assert calls == [(False, 5 + valid)]  # text keys + 13 image keys, 3 pads cut
        else:
            assert collectives == {"p2p": 1}, collectives  # K/V only, no mask beside them
            # image queries: text keys, own block, other block; then text queries likewise
            keys = sorted(k for _, k in calls)
            assert keys == sorted([5, 5, 8, 5, 8, 5]), calls  # block of rank 1: 5 valid keys


def test_gpu_check_skips_cleanly_without_a_gpu():
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run scripts/gpu-check itself")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "gpu-check")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "no CUDA device" in out.stdout


def test_the_text_mask_decision_is_taken_once_per_mask_tensor():
    from ithaca.parallel.attention import ParallelAttention

    attn = ParallelAttention(ParallelState.single())
    mask = torch.ones(2, 5, dtype=torch.bool)
    with _count_host_syncs() as syncs:
        assert attn._drop_if_trivial(mask) is None
        assert attn._drop_if_trivial(mask) is None
    assert syncs["n"] == 1
    mask[0, 4] = False  # changed in place: decided again
    assert attn._drop_if_trivial(mask) is mask
    with torch.inference_mode():  # inference tensors have no version counter
        frozen = torch.ones(2, 5, dtype=torch.bool)
        assert attn._drop_if_trivial(frozen) is None


def _one_rank_skips_a_collective(timeout_s: float):
    import time

    with parallel_state(ParallelConfig(ulysses_degree=2, collective_timeout_s=timeout_s)) as st:
        if st.rank == 1:
            time.sleep(3 * timeout_s)  # alive, group open, but never joins (a hung rank)
            return None
        start = time.monotonic()
        try:
            comm.all_reduce(torch.ones(4), st.replica)
        except RuntimeError as exc:
            return time.monotonic() - start, str(exc)[:200]
        return time.monotonic() - start, "returned"


def test_a_collective_whose_peer_never_comes_raises_after_the_timeout(worker_pool):
    waited, error = worker_pool(2).run(_one_rank_skips_a_collective, 2.0)[0]
    assert error != "returned"
    assert 1.5 <= waited <= 5.5, (waited, error)  # the timeout, not a closed peer


@pytest.mark.parametrize("command", ["serve", "worker-node", "generate"])
def test_cli_flags_reach_the_workers(command):
    from ithaca.cli import _parallel, build_parser
    from ithaca.engine.executor import PipelineSpec, spec_from_json, spec_to_json

    extra = {
        "serve": [],
        "generate": ["--prompt", "x"],
        "worker-node": [
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "h",
            "--master-port",
            "1",
        ],
    }[command]
    args = build_parser().parse_args(
        [command, *extra, "--usp", "2", "--attention-backend", "flash", "--collective-timeout", "9"]
    )
    parallel = _parallel(args)
    assert (parallel.attention_backend, parallel.collective_timeout_s) == ("flash", 9.0)
    spec, _ = spec_from_json(spec_to_json(PipelineSpec(parallel=parallel), 1.0))
    assert spec.parallel == parallel
