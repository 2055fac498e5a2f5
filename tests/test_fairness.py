"""Fair scheduling end to end (a real API, Redis and Celery worker): one key's backlog, built by
hundreds of submit-and-cancel cycles, does not delay another key's job by more than the job
already running, and cancelled jobs never reach a worker. Asserts the order, never the time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from celery import Celery
from service_stack import TINY_SPEC, ServiceStack, service_stack

from app_common.jobs import JobRecord
from app_common.tasks import RUN_JOB_TASK

pytestmark = pytest.mark.slow

# Runs until cancelled (200 epochs of 2 megabatches: minutes), so the test decides when it ends.
LONG_SPEC: dict[str, Any] = {**TINY_SPEC, "training": {**TINY_SPEC["training"], "epochs": 200}}
HANG_GUARD_S = 300.0

Connect = Callable[[str], httpx.Client]


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_url, tmp_path_factory.mktemp("fairness")) as s:
        yield s


@pytest.fixture
def connect(stack: ServiceStack) -> Iterator[Callable[[str], httpx.Client]]:
    """``connect(key_name)``: an HTTP client of a new API key; closed after the test."""
    with contextlib.ExitStack() as clients:

        def make(name: str) -> httpx.Client:
            _, secret = stack.new_key(name)
            headers = {"Authorization": f"Bearer {secret}"}
            return clients.enter_context(httpx.Client(base_url=stack.url, headers=headers, timeout=30))

        yield make


def wait_for(stack: ServiceStack, job_id: str, statuses: set[str]) -> JobRecord:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        record = stack.store.get_job(job_id)
        if record is not None and record.status in statuses:
            return record
        stack.check_alive()
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}\n{stack.log_tail()}")


def test_a_backlog_of_one_key_does_not_delay_another(stack: ServiceStack, connect: Connect) -> None:
    a, b = connect("a"), connect("b")

    def submit(client: httpx.Client, spec: dict[str, Any]) -> httpx.Response:
        return client.post("/api/v1/jobs", json=spec)

    running = submit(a, LONG_SPEC).json()["id"]
    wait_for(stack, running, {"running"})
    queued = [submit(a, TINY_SPEC).json()["id"] for _ in range(7)]  # A's 8 active slots are full
    refused: list[str] = []
    cancelled: list[str] = []
    for _ in range(200):
        if len(queued) == 7:
            victim = queued.pop()
            assert a.post(f"/api/v1/jobs/{victim}/cancel").status_code == 200
            cancelled.append(victim)
        r = submit(a, TINY_SPEC)
        if r.status_code == 202:
            queued.append(r.json()["id"])
        else:
            assert r.status_code == 429, r.text
            refused.append(r.json()["type"])
    assert "urn:anytime-prune:problem:submit-rate-limited" in refused  # 30 a minute by default
    assert len(queued) >= 6 and stack.store.get_job(running).status == "running"

    mine = submit(b, TINY_SPEC).json()["id"]
    assert a.post(f"/api/v1/jobs/{running}/cancel").status_code == 202
    wait_for(stack, running, {"cancelled"})
    done = wait_for(stack, mine, {"succeeded"})
    for job_id in queued:  # only B's job had to run; A's backlog is cancelled unstarted (or stopped)
        a.post(f"/api/v1/jobs/{job_id}/cancel")
    for job_id in queued:
        wait_for(stack, job_id, {"cancelled", "succeeded"})

    # B's job was the next to start after A's running job: before any job of A's backlog.
    assert done.started_at is not None
    a_starts = [r.started_at for r in stack.store.get_jobs(queued) if r.started_at is not None]
    assert all(done.started_at < started for started in a_starts)
    # Cancelled jobs never reached a worker: never started, no attempt, nothing sent to Celery.
    for record in stack.store.get_jobs(cancelled):
        assert record.status == "cancelled" and record.started_at is None and record.attempt == 0
    assert stack.store.celery_queue_length("cpu", stack.env["APP_CELERY_KEY_PREFIX"]) == 0


def idle_pool(stack: ServiceStack, worker: psutil.Process, settle_s: float = 2.0) -> set[int]:
    """The worker's pool children once it is idle: no job running and the same children for
    ``settle_s`` (the child that ran an earlier test's job exits after it, max-tasks-per-child 1,
    and its replacement is forked a moment later)."""
    deadline = time.monotonic() + HANG_GUARD_S
    last: set[int] = set()
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = {p.pid for p in worker.children(recursive=True)}
        if now != last or stack.store.running_jobs():
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= settle_s:
            return now
        time.sleep(0.1)
    raise AssertionError(f"the worker never settled: children {last}, running {stack.store.running_jobs()}")


def dropped(stack: ServiceStack, job_ids: list[str]) -> list[str]:
    """The worker's log lines saying it dropped a message of one of ``job_ids`` unrun."""
    return [line for line in stack.logs["worker"].read_text().splitlines()
            if "message dropped without running" in line and any(job_id in line for job_id in job_ids)]


def test_a_message_for_a_finished_job_is_dropped_without_a_child(stack: ServiceStack, connect: Connect) -> None:
    """A late message (a redelivery, a re-send) for a job that is already over is acknowledged in
    the worker's main process: no pool child is forked for it (max-tasks-per-child is 1)."""
    client = connect("late")
    job_ids = []
    for _ in range(3):
        job_id = client.post("/api/v1/jobs", json=LONG_SPEC).json()["id"]
        client.post(f"/api/v1/jobs/{job_id}/cancel")
        job_ids.append(job_id)
    worker = psutil.Process(stack.processes["worker"].pid)
    idle_pool(stack, worker)  # idle first: the messages reach a worker with free pool slots
    sender = Celery("sender", broker=stack.env["REDIS_URL"], set_as_current=False)
    sender.conf.broker_transport_options = {"global_keyprefix": stack.env["APP_CELERY_KEY_PREFIX"]}
    try:
        for job_id in job_ids:
            sender.send_task(RUN_JOB_TASK, args=[job_id], queue="cpu")
        prefix = stack.env["APP_CELERY_KEY_PREFIX"]
        deadline = time.monotonic() + HANG_GUARD_S
        while stack.store.celery_queue_length("cpu", prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        while len(dropped(stack, job_ids)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sender.close()
    # This test's jobs only: an earlier test's late message may be dropped in the same log.
    assert len(dropped(stack, job_ids)) == 3, stack.log_tail()
    # Dropped by the main process, and no pool process ever logged one of these jobs. (The pool's
    # pids are no evidence here: the child that ran an earlier test's job is replaced once it exits,
    # which under load can come later than idle_pool's settling time.)
    assert all("/MainProcess]" in line for line in dropped(stack, job_ids)), stack.log_tail()
    in_pool = [line for line in stack.logs["worker"].read_text().splitlines()
               if "ForkPoolWorker" in line and any(job_id in line for job_id in job_ids)]
    assert in_pool == [], in_pool
    assert [r.status for r in stack.store.get_jobs(job_ids)] == ["cancelled"] * 3
