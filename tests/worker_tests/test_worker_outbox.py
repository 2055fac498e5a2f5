"""worker/outbox.py: a never-blocking queue with one sender thread. The sender here is a real
thread held on an Event (the receiver "slow" until the test lets it go); tests/test_tracking.py
runs the same outbox against a real HTTP server that holds its requests."""

from __future__ import annotations

import threading

import pytest

from worker.outbox import Outbox

HANG_GUARD_S = 60.0  # for what takes milliseconds


class HeldReceiver:
    """Records each batch it is sent; blocks in the first until :attr:`release` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.holding = threading.Event()

    def __call__(self, batch: list[str]) -> None:
        self.holding.set()
        assert self.release.wait(HANG_GUARD_S)
        self.batches.append(batch)


def test_put_never_waits_and_what_piled_up_goes_as_one_batch_in_order() -> None:
    receiver = HeldReceiver()
    outbox: Outbox[str] = Outbox(receiver, limit=100, name="test-outbox")
    assert outbox.put("open") is None
    assert receiver.holding.wait(HANG_GUARD_S)  # the sender is stuck in the first send
    for i in range(10):
        assert outbox.put(f"m{i}", rank=0) is None
    assert outbox.waiting == 10 and receiver.batches == []
    receiver.release.set()
    assert outbox.close(HANG_GUARD_S) and outbox.join(HANG_GUARD_S)
    assert receiver.batches == [["open"], [f"m{i}" for i in range(10)]]
    assert outbox.dropped == 0 and not outbox.abandoned


def test_full_queue_drops_the_oldest_of_the_lowest_rank() -> None:
    receiver = HeldReceiver()
    outbox: Outbox[str] = Outbox(receiver, limit=3, name="test-outbox")
    outbox.put("open")
    assert receiver.holding.wait(HANG_GUARD_S)
    assert [outbox.put(item, rank=rank) for item, rank in
            [("e1", 0), ("m1", 1), ("e2", 0)]] == [None, None, None]
    assert outbox.put("m2", rank=1) == "e1"  # epochs (rank 0) go first, oldest first
    assert outbox.put("final") is None  # unranked: not counted, never dropped
    assert outbox.put("m3", rank=1) == "e2"
    assert outbox.put("m4", rank=1) == "m1"  # no epoch left: the oldest megabatch
    assert outbox.put("e3", rank=0) == "e3"  # the lowest rank, even when it is the newest
    receiver.release.set()
    assert outbox.close(HANG_GUARD_S)
    assert receiver.batches == [["open"], ["m2", "final", "m3", "m4"]] and outbox.dropped == 4


def test_close_is_bounded_and_abandons_a_stuck_sender() -> None:
    receiver = HeldReceiver()
    outbox: Outbox[str] = Outbox(receiver, limit=10, name="test-outbox")
    outbox.put("open")
    assert receiver.holding.wait(HANG_GUARD_S)
    outbox.put("m1", rank=0)
    assert not outbox.close(0.2)  # the receiver never answers within the bound
    assert outbox.abandoned and outbox.waiting == 0
    assert outbox.put("late") is None and outbox.waiting == 0  # refused after close
    receiver.release.set()
    assert outbox.join(HANG_GUARD_S)  # the stuck send returns, and nothing more is sent
    assert receiver.batches == [["open"]]


def test_close_without_items_and_a_bad_limit() -> None:
    outbox: Outbox[str] = Outbox(HeldReceiver(), limit=1, name="test-outbox")
    assert outbox.close(0.0) and outbox.join(0.0)  # no thread was ever started
    with pytest.raises(ValueError, match="limit"):
        Outbox(HeldReceiver(), limit=0, name="test-outbox")
