"""The queue and batching rule, without processes or threads beyond the test's own.

Pyramid for tests/engine: scheduler rules (here, no processes); the engine over the
in-process executor (test_engine.py); one torchrun worker group at --usp 2 on gloo
for the READY handshake, crash and hang detection (test_worker_group.py).
"""

import threading
import time

import pytest

from ithaca.engine.errors import QueueFullError
from ithaca.engine.scheduler import EngineRequest, Scheduler, batch_key
from ithaca.types import GenerationParams


def req(size=64, steps=2, n=1, rid="", **kw) -> EngineRequest:
    return EngineRequest(
        GenerationParams(
            "p",
            width=size,
            height=size,
            num_inference_steps=steps,
            num_images=n,
            request_id=rid,
            **kw,
        )
    )


def test_batch_key_separates_what_cannot_share_a_forward_pass():
    base = batch_key(req().params)
    assert batch_key(req(seed=5).params) == base  # seeds and prompts batch together
    assert batch_key(req(size=128).params) != base
    assert batch_key(req(steps=3).params) != base
    assert batch_key(req(true_cfg_scale=4.0).params) != base
    assert batch_key(req(negative_prompt="blurry").params) != base
    from PIL import Image

    edit_a = req(rid="a", images=[Image.new("RGB", (8, 8))])
    edit_b = req(rid="b", images=[Image.new("RGB", (8, 8))])
    assert edit_a.key != edit_b.key  # edits always run alone


def test_queue_full_raises_with_retry_after():
    s = Scheduler(max_queue_size=2, max_batch_size=4, batch_wait_ms=0)
    s.add(req())
    s.add(req())
    with pytest.raises(QueueFullError) as info:
        s.add(req())
    assert info.value.status == 429 and info.value.retry_after >= 1
    assert len(s) == 2


def test_batch_is_built_around_the_oldest_request_and_skips_incompatible_ones():
    s = Scheduler(max_queue_size=10, max_batch_size=3, batch_wait_ms=0)
    a1, b1, a2, a3, a4, b2 = req(64), req(128), req(64), req(64), req(64), req(128)
    for r in (a1, b1, a2, a3, a4, b2):
        s.add(r)
    assert s.next_batch(0.1) == [a1, a2, a3]  # capped at 3 images, b1 skipped
    assert s.next_batch(0.1) == [b1, b2]  # the skipped head runs next, with its company
    assert s.next_batch(0.1) == [a4]
    assert s.next_batch(0.01) == []


def test_images_count_towards_the_batch_limit():
    s = Scheduler(max_queue_size=10, max_batch_size=4, batch_wait_ms=0)
    a, b, c = req(n=3), req(n=2), req(n=1)
    for r in (a, b, c):
        s.add(r)
    assert s.next_batch(0.1) == [a, c]  # 3 + 1 images; b (2) would exceed 4
    assert s.next_batch(0.1) == [b]


def test_a_lone_head_waits_at_most_batch_wait_for_company():
    s = Scheduler(max_queue_size=10, max_batch_size=4, batch_wait_ms=150)
    first = req()
    s.add(first)
    late = req()
    threading.Timer(0.05, s.add, args=(late,)).start()
    start = time.monotonic()
    assert s.next_batch(1.0) == [first, late]
    assert 0.1 <= time.monotonic() - start < 0.5  # waited for the window, not the timeout

    s.add(req())
    start = time.monotonic()
    assert len(s.next_batch(1.0)) == 1
    assert time.monotonic() - start < 0.4


def test_removed_requests_leave_the_queue():
    s = Scheduler(max_queue_size=10, max_batch_size=4, batch_wait_ms=0)
    a, b = req(), req()
    s.add(a)
    s.add(b)
    assert s.remove(a) and not s.remove(a)
    assert s.next_batch(0.1) == [b]


def test_joiners_come_oldest_first_and_stop_at_the_first_incompatible_request():
    s = Scheduler(max_queue_size=8, max_batch_size=4, batch_wait_ms=0)
    first, second, other, third = req(rid="1"), req(rid="2"), req(size=128, rid="o"), req(rid="3")
    for r in (first, second, other, third):
        s.add(r)

    def accepts(params, resolved):
        return params.width == 64

    # "3" is compatible but waits behind "o": joining would overtake it.
    assert s.take_joiners(accepts, room=4) == [first, second]
    assert s.take_joiners(accepts, room=4) == []
    assert len(s) == 2
    s.remove(other)
    assert s.take_joiners(accepts, room=0) == []  # no free row
    big = req(n=3, rid="big")
    s.add(big)
    assert s.take_joiners(accepts, room=2) == [third]  # "big" (3 images) does not fit in 1
