"""Webhooks for real: the API, a cpu worker and the control worker (whose courier delivers) on a
real Redis, tiny digits jobs, and a receiver on 127.0.0.1 that verifies every delivery with the
Standard Webhooks reference library (``standardwebhooks``).

Two tiny jobs run one after the other on the one worker: the first notifies a receiver that
sleeps 30 s on ``job.started`` and answers 200 at once to ``job.completed``; the second one that
answers 500 then 200 to each delivery (megabatch, 4 megabatches). A third job, cancelled while
queued (completed, without training), notifies a receiver that redirects.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from service_stack import ServiceStack, service_stack
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from anytime_prune.client import Client

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "dataset": {"name": "digits"}, "architecture": "mlp", "method": "app", "sparsity": {"target": 0.5},
    "stream": {"megabatches": 2}, "training": {"epochs": 1, "precision": "fp32", "seed": 3},
}
SLEEP_S = 30.0
WAIT_S = 120.0  # hang guard for a tiny job and its deliveries


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float  # time.time()
    done: float | None = None  # when the handler answered (or gave up)


class Receiver:
    """A webhook receiver on 127.0.0.1: ``/flaky`` answers 500 to the first attempt of each
    webhook-id and 200 to the next, ``/slow`` sleeps 30 s on ``job.started`` (200 to the rest),
    ``/redirect`` 302 to ``/target``; anything else 200."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()},
                          self.rfile.read(int(self.headers.get("content-length") or 0)), time.time())
                with receiver.lock:
                    receiver.hits.append(hit)
                    first = [h.headers.get("webhook-id") for h in receiver.hits].count(hit.headers.get("webhook-id"))
                status, location = 200, None
                if self.path == "/flaky" and first == 1:
                    status = 500
                elif self.path == "/slow" and json.loads(hit.body)["type"] == "job.started":
                    receiver.wake.wait(SLEEP_S)
                elif self.path == "/redirect":
                    status, location = 302, f"http://127.0.0.1:{receiver.port}/target"
                hit.done = time.time()
                try:
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the courier gave up waiting (its timeout) and closed the connection
                    pass

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def wait_for(self, what: str, check: Callable[[], bool], stack: ServiceStack) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{stack.log_tail()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.wake.set()
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    env = {"APP_WEBHOOK_ALLOW_PRIVATE": "true", "APP_WEBHOOK_RETRY_BASE_S": "0.5", "APP_WEBHOOK_RETRY_MAX_S": "1",
           "APP_WEBHOOK_MAX_ATTEMPTS": "4"}
    with service_stack(redis_url, tmp_path_factory.mktemp("webhooks"), extra_env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: ServiceStack) -> Iterator[Client]:
    _, secret = stack.new_key("hooks")
    with stack.client(secret) as c:
        yield c


@pytest.fixture(scope="module")
def secret(stack: ServiceStack, client: Client) -> str:
    result = stack.cli("webhooks", "secret", secret=client.api_key)
    assert result.returncode == 0, result.stderr
    value = result.stdout.strip()
    assert value == client.webhook_secret() and value.startswith("whsec_")
    return value


@pytest.fixture(scope="module")
def jobs(client: Client, receiver: Receiver, secret: str) -> dict[str, str]:
    """Submitted together (they run in this order): name -> job id."""
    flaky = {"url": receiver.url("/flaky"), "events": ["megabatch"]}
    bodies = {
        "slow": {**SPEC, "notify": {"url": receiver.url("/slow"), "events": ["started", "completed"]}},
        "flaky": {**SPEC, "stream": {"megabatches": 4}, "notify": flaky},
        "redirect": {**SPEC, "notify": {"url": receiver.url("/redirect")}},
    }
    ids = {name: client.submit(body)["id"] for name, body in bodies.items()}
    client.cancel(ids["redirect"])  # queued behind the others: cancelled at once, and completed
    return ids


def verified(hit: Hit, secret: str) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(hit.body, hit.headers)
    assert hit.headers["content-type"] == "application/json"
    return payload


def test_a_slow_receiver_does_not_hold_the_job(
    client: Client, receiver: Receiver, jobs: dict[str, str], secret: str, stack: ServiceStack
) -> None:
    job = client.wait(jobs["slow"], timeout=WAIT_S)
    assert job["status"] == "succeeded", (job["error"], stack.log_tail())
    finished = datetime.fromisoformat(job["finished_at"]).timestamp()
    hits = [h for h in receiver.at("/slow") if verified(h, secret)["type"] == "job.started"]
    assert hits, "the started webhook was sent while the job ran"
    first = hits[0]
    # The job ended while the receiver was still asleep on the first delivery.
    assert first.arrived < finished and (first.done is None or first.done > finished)
    assert job["progress"]["megabatch"] == 2 and job["error"] is None


def test_completed_once_with_the_job_as_get_returns_it(
    client: Client, receiver: Receiver, jobs: dict[str, str], secret: str, stack: ServiceStack
) -> None:
    job_id = jobs["slow"]  # its receiver sleeps on job.started only: completed goes through meanwhile
    job = client.wait(job_id, timeout=WAIT_S)
    assert job["status"] == "succeeded", (job["error"], stack.log_tail())
    receiver.wait_for("the completed webhook", lambda: any(
        a["outcome"] == "delivered" and a["event"] == "job.completed" for a in client.deliveries(job_id)), stack)
    [hit] = [h for h in receiver.at("/slow") if verified(h, secret)["type"] == "job.completed"]
    payload = verified(hit, secret)
    assert payload["type"] == "job.completed" and set(payload) == {"type", "timestamp", "data"}
    assert payload["data"] == client.status(job_id)
    [attempt] = [a for a in client.deliveries(job_id) if a["event"] == "job.completed"]
    assert attempt["webhook_id"] == hit.headers["webhook-id"] and attempt["status_code"] == 200
    assert attempt["event"] == "job.completed" and attempt["attempt"] == 1 and attempt["next_attempt_at"] is None
    # A body changed in transit fails verification.
    tampered = json.loads(hit.body)
    tampered["data"]["status"] = "failed"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(json.dumps(tampered, separators=(",", ":")), hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(hit.body.replace(b"succeeded", b"cancelled"), hit.headers)


def test_each_megabatch_delivered_and_retried_with_the_same_id(
    client: Client, receiver: Receiver, jobs: dict[str, str], secret: str, stack: ServiceStack
) -> None:
    job_id = jobs["flaky"]
    job = client.wait(job_id, timeout=WAIT_S)
    assert job["status"] == "succeeded", (job["error"], stack.log_tail())
    receiver.wait_for("4 megabatch webhooks delivered", lambda: sum(
        a["outcome"] == "delivered" for a in client.deliveries(job_id)) == 4, stack)
    by_id: dict[str, list[Hit]] = {}
    for hit in receiver.at("/flaky"):
        by_id.setdefault(hit.headers["webhook-id"], []).append(hit)
    assert len(by_id) == 4
    indices = []
    for hits in by_id.values():
        assert len(hits) == 2  # 500, then 200: the same webhook-id and the same body
        first, second = (verified(h, secret) for h in hits)
        assert first == second and hits[0].body == hits[1].body
        assert first["type"] == "job.megabatch" and first["data"]["id"] == job_id
        index = first["megabatch"]["index"]
        indices.append(index)
        assert first["megabatch"]["metrics"]["test_accuracy"] == client.metrics(job_id)["megabatches"][index - 1][
            "test_accuracy"]
        assert first["data"]["progress"]["megabatch"] == index  # the job as it was at that megabatch
    assert sorted(indices) == [1, 2, 3, 4]
    history = client.deliveries(job_id)
    assert sorted((a["megabatch"], a["attempt"], a["status_code"]) for a in history) == [
        (i, n, code) for i in (1, 2, 3, 4) for n, code in ((1, 500), (2, 200))]


def test_client_and_cli_list_a_jobs_deliveries(
    client: Client, receiver: Receiver, jobs: dict[str, str], stack: ServiceStack
) -> None:
    job_id = jobs["flaky"]  # 4 megabatch webhooks, each 500 then 200: 8 attempts once all are delivered
    receiver.wait_for("4 megabatch webhooks delivered", lambda: sum(
        a["outcome"] == "delivered" for a in client.deliveries(job_id)) == 4, stack)
    listing = client.deliveries(job_id)
    as_json = stack.cli("webhooks", "deliveries", job_id, "--json", secret=client.api_key)
    table = stack.cli("webhooks", "deliveries", job_id, secret=client.api_key)
    missing = stack.cli("webhooks", "deliveries", "0" * 32, secret=client.api_key)
    assert as_json.returncode == 0 and table.returncode == 0, (as_json.stderr, table.stderr)
    assert json.loads(as_json.stdout) == listing and len(listing) == 8
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["time", "(UTC)", "event", "megabatch", "webhook-id", "attempt", "status", "outcome",
                              "next", "(UTC)", "/", "error"]
    # date, time, event, megabatch, webhook-id, attempt, status, outcome[, next attempt's date and time]
    rows = [line.split() for line in lines]
    assert sorted((r[2], int(r[3]), int(r[5]), r[6], r[7], len(r)) for r in rows) == [
        ("job.megabatch", i, n, code, outcome, size)
        for i in (1, 2, 3, 4) for n, code, outcome, size in ((1, "500", "retrying", 10), (2, "200", "delivered", 8))]
    assert [r[4] for r in rows] == [a["webhook_id"] for a in listing]  # oldest first, as the API lists them
    assert missing.returncode == 4 and "404" in missing.stderr, missing.stderr


def test_a_redirect_is_not_followed(
    client: Client, receiver: Receiver, jobs: dict[str, str], stack: ServiceStack
) -> None:
    job_id = jobs["redirect"]
    job = client.wait(job_id, timeout=WAIT_S)
    assert job["status"] == "cancelled", (job["error"], stack.log_tail())
    receiver.wait_for("the redirected webhook's attempts", lambda: len(client.deliveries(job_id)) >= 2, stack)
    first, second = client.deliveries(job_id)[:2]
    assert first["status_code"] == 302 and first["outcome"] == "retrying" and first["next_attempt_at"]
    assert second["webhook_id"] == first["webhook_id"] and second["attempt"] == 2
    assert receiver.at("/target") == [] and len(receiver.at("/redirect")) >= 2


def test_cli_shows_and_rotates_the_secret(stack: ServiceStack) -> None:
    _, key = stack.new_key("rotator")  # its own key: the other tests' deliveries keep their secret
    before = stack.cli("webhooks", "secret", secret=key)
    rotated = stack.cli("webhooks", "rotate", "--json", secret=key)
    after = stack.cli("webhooks", "secret", secret=key)
    assert before.returncode == rotated.returncode == after.returncode == 0, (before.stderr, rotated.stderr)
    new = json.loads(rotated.stdout)["secret"]
    assert new.startswith("whsec_") and new != before.stdout.strip() and after.stdout.strip() == new
    assert stack.cli("webhooks", "secret", secret="wrong").returncode == 4  # the API's 401
