"""Redis killed mid-job (SIGKILL, append-only file on) and started again on the same port and data:
one delivery, and every epoch and megabatch in the event stream and the metrics, in order, once.

One job lives through two outages, with a 3 s lease (the service's 30 s scaled down): a short
one (2 s: longer than the old sink's 1.5 s of retries, shorter than the lease) after its first
megabatch, and a long one (8 s: over two lease TTLs, so every lease has expired when Redis comes
back) after its second (the run may end during it: the worker then waits for Redis to write the
rest). The worker trains on through both, buffers its events, re-takes its lease as soon as
Redis answers, and neither the reaper nor Celery's own redelivery of the message (it restores
unacknowledged messages when its connection drops) runs the job a second time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import RedisError
from service_stack import TINY_SPEC, ServiceStack, free_port, service_stack

from anytime_prune.client import Client
from app_common.redis_server import PID_FILE, EmbeddedRedis
from app_common.store import JobStore

pytestmark = pytest.mark.slow

LEASE_TTL_S = 3
SHORT_OUTAGE_S = 2.0
LONG_OUTAGE_S = 8.0
# About 3 s a megabatch on an idle core: the outages come while it trains.
MEGABATCHES, EPOCHS = 3, 150


class PersistentRedis:
    """An embedded Redis on a fixed port and data folder that can be killed and started again."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.server = EmbeddedRedis(data_dir=data_dir, port=self.port).start()

    @property
    def url(self) -> str:
        return self.server.url

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would: acknowledged writes are in the append-only file
        already (written before the reply; only the fsync is once a second)."""
        pid = int((self.data_dir / PID_FILE).read_text())
        os.kill(pid, signal.SIGKILL)
        self.server.stop()  # reaps the process

    def restart(self) -> None:
        self.server = EmbeddedRedis(data_dir=self.data_dir, port=self.port).start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path_factory.mktemp("redis-aof"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(redis_server: PersistentRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_server.url, tmp_path_factory.mktemp("outage"),
                       extra_env={"APP_JOB_LEASE_TTL_S": str(LEASE_TTL_S)}) as running:
        yield running


def wait_for(condition: Any, timeout_s: float, what: str, stack: ServiceStack) -> None:
    """Poll ``condition()`` (Redis errors count as "not yet"), with a hang guard."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(RedisError):
            if condition():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{stack.log_tail()}")


def megabatches_done(store: JobStore, job_id: str) -> int:
    return len(store.history(job_id)["megabatches"])


def test_redis_outages_mid_job_lose_no_event_and_cause_no_second_delivery(
    stack: ServiceStack, redis_server: PersistentRedis
) -> None:
    _, secret = stack.new_key("outage")
    spec = dict(TINY_SPEC, stream={"megabatches": MEGABATCHES}, training={"epochs": EPOCHS, "precision": "fp32",
                                                                           "seed": 5})
    store = stack.store
    with Client(stack.url, secret) as client:
        job_id = client.submit(spec)["id"]
        for done, outage_s in ((1, SHORT_OUTAGE_S), (2, LONG_OUTAGE_S)):
            wait_for(lambda n=done: megabatches_done(store, job_id) >= n, 300, f"megabatch {done}", stack)
            redis_server.kill()
            time.sleep(outage_s)
            redis_server.restart()
            stack.check_alive()  # API and workers live through it
        wait_for(lambda: store.get_job(job_id).terminal, 300, "the end of the job", stack)  # type: ignore[union-attr]

        final = client.status(job_id)
        assert final["status"] == "succeeded", (final, stack.log_tail())
        assert final["attempt"] == 1, stack.log_tail()  # one delivery: nobody took the job over
        assert final["events_lost"] == 0 and final["stale"] is False
        assert final["heartbeat_at"] is not None

        every_epoch = [(m, e) for m in range(1, MEGABATCHES + 1) for e in range(1, EPOCHS + 1)]
        stream = list(client.events(job_id))
        assert [e.data for e in stream if e.type == "run_started"] == [
            next(e.data for e in stream if e.type == "run_started")
        ]  # one run, never resumed
        assert [(e.data["megabatch"], e.data["epoch"]) for e in stream if e.type == "epoch_ended"] == every_epoch
        assert [e.data["megabatch"] for e in stream if e.type == "megabatch_ended"] == list(range(1, MEGABATCHES + 1))
        statuses = [e.data["status"] for e in stream if e.type == "status_changed"]
        assert statuses == ["running", "succeeded"]
        ids = [e.id for e in stream]
        assert len(set(ids)) == len(ids)

        metrics = client.metrics(job_id)
        assert [m["megabatch"] for m in metrics["megabatches"]] == list(range(1, MEGABATCHES + 1))
        assert [(e["megabatch"], e["epoch"]) for e in metrics["epochs"]] == every_epoch
    # The worker noticed both outages and said so, once each (not once per event).
    worker_log = stack.logs["worker"].read_text(errors="replace")
    buffered = worker_log.count("buffering events until it answers")
    assert buffered in (1, 2), stack.log_tail()
    assert worker_log.count("Redis answers again; wrote") == buffered
    assert "re-enqueued" not in worker_log and "resuming after a lost worker" not in worker_log
