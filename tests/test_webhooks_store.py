"""Webhooks in the store: signing secrets, deliveries queued by the scripts that write the change,
claims and attempts, deadlines; the URL policy and the retry schedule (app_common.webhooks); the
courier's connection to exactly the address it checked (DNS rebinding), over HTTP and HTTPS."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from factories import megabatch_ended, megabatch_metrics
from standardwebhooks import Webhook

from app_common.events import CANCELLED, QUEUED, RUNNING, SUCCEEDED, MegabatchEnded
from app_common.jobs import Notify
from app_common.public import public_job
from app_common.settings import Settings
from app_common.store import JobStore
from app_common.store.records import decode_record
from app_common.webhooks import (
    Unresolvable,
    UnsafeUrl,
    check_url,
    delivery_body,
    delivery_window_s,
    forbidden_reason,
    retry_delay_s,
    vetted_addresses,
)

SPEC: dict[str, Any] = {"dataset": {"name": "digits"}, "stream": {"megabatches": 4}, "training": {"epochs": 1}}


def job_with(store: JobStore, events: list[str] | None) -> str:
    notify = None if events is None else Notify.model_validate({"url": "http://127.0.0.1:9/hook", "events": events})
    return store.create_job("key_a", SPEC, queue="cpu", notify=notify).id


def due(store: JobStore) -> list[str]:
    token, ids = store.claim_deliveries(100, 60.0)
    return ids


def megabatch_event(index: int) -> MegabatchEnded:
    return megabatch_ended(index, test_accuracy=0.5 + index / 10, density=1.0 / index)


def test_secret_is_per_key_created_once_rotated_and_revoked_with_the_key(store: JobStore) -> None:
    key_id, _ = store.create_key("ci")
    secret = store.webhook_secret(key_id)
    assert secret.startswith("whsec_") and store.webhook_secret(key_id) == secret
    assert store.webhook_secret("key_other") != secret
    Webhook(secret)  # a secret the reference library accepts
    rotated = store.rotate_webhook_secret(key_id)
    assert rotated != secret and store.webhook_secret(key_id) == rotated
    assert store.revoke_key(key_id)
    assert store.webhook_secret(key_id) not in (secret, rotated)  # a new key id would start afresh


def test_completed_is_queued_with_the_terminal_status_and_a_copy_of_the_record(store: JobStore) -> None:
    job_id = job_with(store, ["completed"])
    assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
    store.append_event(job_id, megabatch_event(1))
    assert store.pending_deliveries() == 0  # neither started nor megabatch was asked for
    assert store.transition(job_id, SUCCEEDED, allowed_from={RUNNING})
    [msg_id] = due(store)
    assert msg_id.startswith("msg_")
    delivery = store.get_delivery(msg_id)
    assert delivery is not None and delivery.event == "completed" and delivery.job_id == job_id
    assert delivery.attempts == 0 and delivery.body is None and delivery.megabatch is None
    record = decode_record(delivery.record_fields)
    assert record is not None and record == store.get_job(job_id)
    body = json.loads(delivery_body(delivery.event, delivery.timestamp, public_job(record), None))
    assert body["type"] == "job.completed" and body["data"]["status"] == SUCCEEDED and body["data"]["id"] == job_id
    assert set(body) == {"type", "timestamp", "data"}


def test_started_once_even_when_a_resume_moves_the_job_to_running_again(store: JobStore) -> None:
    job_id = job_with(store, ["started"])
    assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
    assert store.transition(job_id, RUNNING, reason="attempt 2: resuming", allowed_from={QUEUED, RUNNING})
    assert store.transition(job_id, SUCCEEDED, allowed_from={RUNNING})
    [msg_id] = due(store)
    delivery = store.get_delivery(msg_id)
    assert delivery is not None and delivery.event == "started"
    record = decode_record(delivery.record_fields)
    assert record is not None and record.status == RUNNING


@pytest.mark.parametrize("how", ["cancel queued", "reaper fails it", "cancel running"])
def test_every_terminal_status_is_completed(store: JobStore, how: str) -> None:
    job_id = job_with(store, ["completed"])
    if how == "cancel queued":
        store.request_cancel(job_id)
    elif how == "reaper fails it":
        assert store.transition(job_id, "failed", reason="worker died 3 times; giving up", allowed_from={QUEUED})
    else:
        assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
        store.request_cancel(job_id)
        assert store.pending_deliveries() == 0  # cancelling is not terminal
        assert store.transition(job_id, CANCELLED, allowed_from={"cancelling"})
    [msg_id] = due(store)
    delivery = store.get_delivery(msg_id)
    assert delivery is not None and delivery.event == "completed"
    store.request_cancel(job_id)  # a terminal job: nothing changes, nothing more is queued
    assert due(store) == []


def test_each_megabatch_once_with_its_index_and_metrics(store: JobStore) -> None:
    job_id = job_with(store, ["megabatch"])
    assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
    for index in (1, 2, 2):  # a resumed job replays megabatch 2: dropped, no second delivery
        store.append_event(job_id, megabatch_event(index))
    deliveries = [store.get_delivery(m) for m in due(store)]
    assert sorted(d.megabatch["index"] for d in deliveries if d and d.megabatch) == [1, 2]
    for d in deliveries:
        assert d is not None and d.megabatch is not None
        i = d.megabatch["index"]
        assert d.megabatch["metrics"] == megabatch_metrics(i, test_accuracy=0.5 + i / 10, density=1.0 / i).to_dict()
        record = decode_record(d.record_fields)
        assert record is not None and record.progress.megabatch == d.megabatch["index"]  # the job at that event


def test_no_notify_queues_nothing(store: JobStore) -> None:
    job_id = job_with(store, None)
    assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
    store.append_event(job_id, megabatch_event(1))
    assert store.transition(job_id, SUCCEEDED, allowed_from={RUNNING})
    assert store.pending_deliveries() == 0


def test_claims_are_exclusive_expire_and_finish_only_with_their_token(store: JobStore) -> None:
    job_id = job_with(store, ["completed"])
    store.request_cancel(job_id)
    token, [msg_id] = store.claim_deliveries(10, 0.2)
    assert store.claim_deliveries(10, 60.0)[1] == []  # held: no second courier gets it
    time.sleep(0.3)
    token2, ids = store.claim_deliveries(10, 60.0)  # the first courier died: its claim came back
    assert ids == [msg_id] and token2 != token
    delivery = store.get_delivery(msg_id)
    assert delivery is not None and delivery.claim == token2
    attempt = {"time": "t", "event": "job.completed", "webhook_id": msg_id, "attempt": 1, "status_code": 500,
               "error": None, "outcome": "retrying", "next_attempt_at": "later"}
    assert not store.finish_attempt(delivery, token, attempt, body="{}", next_at_ms=0)  # the old claim
    assert store.finish_attempt(delivery, token2, attempt, body='{"a":1}', next_at_ms=0)
    assert store.delivery_attempts(job_id) == [attempt]
    token3, [again] = store.claim_deliveries(10, 60.0)
    retry = store.get_delivery(again)
    assert again == msg_id and retry is not None and retry.attempts == 1 and retry.body == '{"a":1}'
    done = {**attempt, "attempt": 2, "status_code": 200, "outcome": "delivered", "next_attempt_at": None}
    assert store.finish_attempt(retry, token3, done, body='{"a":1}', next_at_ms=None)
    assert store.get_delivery(msg_id) is None and store.pending_deliveries() == 0
    assert [a["attempt"] for a in store.delivery_attempts(job_id)] == [1, 2]
    assert store.delete_job(job_id)
    assert store.delivery_attempts(job_id) == []


def test_retry_schedule_spans_about_an_hour_by_default() -> None:
    s = Settings()
    delays = [retry_delay_s(n, base_s=s.webhook_retry_base_s, max_s=s.webhook_retry_max_s)
              for n in range(1, s.webhook_max_attempts)]
    assert delays[:3] == [5.0, 10.0, 20.0] and max(delays) == s.webhook_retry_max_s
    assert 50 * 60 <= sum(delays) <= 75 * 60


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
     "240.0.0.1", "100.64.0.1", "::1", "fe80::1", "fc00::1", "::", "::ffff:127.0.0.1", "ff02::1"],
)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert forbidden_reason(address) is not None
    with pytest.raises(UnsafeUrl):
        check_url(f"http://[{address}]/" if ":" in address else f"http://{address}/", allow_private=False,
                  timeout_s=1.0)
    check_url(f"http://{address}/", allow_private=True, timeout_s=1.0)


def test_public_addresses_pass_and_names_are_resolved_with_a_bound() -> None:
    assert forbidden_reason("93.184.215.14") is None and forbidden_reason("2606:4700::1111") is None
    check_url("https://93.184.215.14:8443/hook", allow_private=False, timeout_s=1.0)
    with pytest.raises(UnsafeUrl, match="localhost resolves to"):
        check_url("http://localhost:8000/", allow_private=False, timeout_s=5.0)
    start = time.monotonic()
    with pytest.raises(UnsafeUrl, match="resolve"):
        check_url("http://no-such-host.invalid/", allow_private=False, timeout_s=5.0)
    assert time.monotonic() - start < 50.0  # a hang guard, not a speed claim


def test_the_courier_refuses_a_private_address_at_delivery_and_gives_up_after_the_last_attempt(
    store: JobStore,
) -> None:
    from worker.courier import Courier

    # Accepted at submit (the name resolved elsewhere then, or the server allowed it); not now.
    settings = Settings(webhook_allow_private=False, webhook_max_attempts=2, webhook_retry_base_s=0.01)
    job_id = job_with(store, ["completed"])
    store.request_cancel(job_id)
    courier = Courier(store, settings)
    try:
        for number, outcome in ((1, "retrying"), (2, "failed")):
            deadline = time.monotonic() + 30
            token, ids = store.claim_deliveries(10, 60.0)
            while not ids and time.monotonic() < deadline:  # the retry is due 10 ms later
                time.sleep(0.02)
                token, ids = store.claim_deliveries(10, 60.0)
            [msg_id] = ids
            entry = courier.attempt(msg_id, token)
            assert entry is not None and entry["attempt"] == number and entry["outcome"] == outcome
            assert entry["status_code"] is None and entry["error"].startswith("refused: 127.0.0.1 is a loopback")
        assert store.pending_deliveries() == 0 and store.get_delivery(msg_id) is None
        history = store.delivery_attempts(job_id)
        assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "retrying"), (2, "failed")]
        assert history[0]["next_attempt_at"] is not None and history[1]["next_attempt_at"] is None
        assert courier.attempt(msg_id, token) is None  # gone: nothing to do
    finally:
        courier.stop()


def test_a_delivery_whose_body_cannot_be_built_is_given_up_at_once(store: JobStore) -> None:
    from worker.courier import Courier

    job_id = job_with(store, ["completed"])
    store.request_cancel(job_id)
    token, [msg_id] = store.claim_deliveries(10, 60.0)
    store.redis.hset(store.names.webhook_message(msg_id), "record", "[]")  # no record kept
    courier = Courier(store, Settings(webhook_allow_private=True))
    try:
        entry = courier.attempt(msg_id, token)
    finally:
        courier.stop()
    assert entry is not None and entry["outcome"] == "failed" and entry["error"].startswith("could not build")
    assert store.pending_deliveries() == 0  # not retried forever


# --- deadlines: deliveries nobody could deliver are given up, courier or not ------------------------


def queued_set(store: JobStore) -> int:
    return int(store.redis.zcard(store.names.webhook_queued))


def test_the_retry_window_is_derived_from_the_settings() -> None:
    s = Settings()
    waits = sum(retry_delay_s(n, base_s=5, max_s=600) for n in range(1, 13))
    assert delivery_window_s(s) == waits + 13 * (s.webhook_resolve_timeout_s + s.webhook_timeout_s)
    assert 60 * 60 <= delivery_window_s(s) <= 65 * 60  # 13 attempts, about an hour
    short = Settings(webhook_max_attempts=1, webhook_timeout_s=0.05, webhook_resolve_timeout_s=0.05)
    assert delivery_window_s(short) == pytest.approx(0.1)


def test_a_delivery_past_its_deadline_is_given_up_with_the_reason_in_its_history(store: JobStore) -> None:
    job_id = job_with(store, ["completed"])
    store.request_cancel(job_id)  # completed: queued, and no courier runs
    [msg_id] = store.redis.zrange(store.names.webhook_due, 0, -1)
    assert queued_set(store) == 1
    assert store.expire_deliveries(3600.0) == []  # within its window: left alone
    time.sleep(0.12)
    assert store.expire_deliveries(0.1) == [msg_id]
    assert store.pending_deliveries() == 0 and queued_set(store) == 0 and store.get_delivery(msg_id) is None
    [entry] = store.delivery_attempts(job_id)
    assert entry["outcome"] == "failed" and entry["attempt"] == 0 and entry["status_code"] is None
    assert entry["webhook_id"] == msg_id and entry["event"] == "job.completed" and entry["next_attempt_at"] is None
    assert entry["error"].startswith("expired: not delivered within its retry window of 0.1 s")
    assert "never attempted" in entry["error"] and "`webhooks` extra" in entry["error"]
    assert store.expire_deliveries(0.1) == []  # once


def test_a_held_delivery_is_left_to_its_courier_and_expires_after_its_attempt(store: JobStore) -> None:
    job_id = job_with(store, ["megabatch"])
    assert store.transition(job_id, RUNNING, allowed_from={QUEUED})
    store.append_event(job_id, megabatch_event(1))
    token, [msg_id] = store.claim_deliveries(10, 60.0)
    time.sleep(0.05)
    assert store.expire_deliveries(0.01) == []  # a courier is making an attempt right now
    delivery = store.get_delivery(msg_id)
    assert delivery is not None and delivery.queued_ms is not None
    attempt = {"time": "t", "event": "job.megabatch", "webhook_id": msg_id, "attempt": 1, "status_code": 503,
               "error": None, "outcome": "retrying", "next_attempt_at": "later", "megabatch": 1}
    assert store.finish_attempt(delivery, token, attempt, body="{}", next_at_ms=10**13)  # a retry far off
    assert store.expire_deliveries(0.01) == [msg_id]
    first, last = store.delivery_attempts(job_id)
    assert first == attempt and last["attempt"] == 1 and last["megabatch"] == 1 and last["outcome"] == "failed"
    assert last["error"].startswith("expired:") and "1 attempt made, none delivered" in last["error"]
    assert store.pending_deliveries() == 0 and queued_set(store) == 0


def test_expiry_is_bounded_per_call_oldest_first_and_covers_deliveries_queued_before_deadlines(
    store: JobStore,
) -> None:
    jobs = []
    for _ in range(5):
        jobs.append(job_with(store, ["completed"]))
        store.request_cancel(jobs[-1])
        time.sleep(0.002)  # distinct queued times
    msgs = [str(m) for m in store.redis.zrange(store.names.webhook_queued, 0, -1)]
    # The oldest as an earlier version queued it: no queued time, in no queued set.
    store.redis.zrem(store.names.webhook_queued, msgs[0])
    store.redis.hdel(store.names.webhook_message(msgs[0]), "queued")
    time.sleep(0.05)
    assert store.expire_deliveries(0.01, limit=2) == msgs[1:3]
    assert store.expire_deliveries(0.01, limit=2) == msgs[3:5]
    assert store.expire_deliveries(0.01, limit=2) == [msgs[0]]  # found in the due set
    assert store.pending_deliveries() == 0
    assert [len(store.delivery_attempts(j)) for j in jobs] == [1] * 5
    # A deleted job's delivery goes too, without a history to write to.
    gone = job_with(store, ["completed"])
    store.request_cancel(gone)
    assert store.delete_job(gone)
    time.sleep(0.02)
    assert len(store.expire_deliveries(0.01)) == 1 and store.pending_deliveries() == 0


def test_every_workers_reaper_expires_deliveries_with_short_settings(
    store: JobStore, redis_url: str, key_prefix: str
) -> None:
    """No courier anywhere (the `webhooks` extra missing on the control worker): a worker's reaper
    pass gives the delivery up once its retry window, from the settings, has passed."""
    from worker.celery_app import make_celery
    from worker.reaper import ReaperThread

    short = Settings(redis_url=redis_url, redis_prefix=key_prefix, celery_key_prefix=f"{key_prefix}:celery:",
                     webhook_max_attempts=2, webhook_retry_base_s=0.05, webhook_timeout_s=0.05,
                     webhook_resolve_timeout_s=0.05)
    window = delivery_window_s(short)
    assert window == pytest.approx(0.25)
    app = make_celery(short)
    try:
        job_id = job_with(store, ["completed"])
        store.request_cancel(job_id)
        reaper = ReaperThread(store, app, short, interval_s=3600)  # passes run by hand
        reaper.reap_once()
        assert store.pending_deliveries() == 1  # not yet
        time.sleep(window + 0.05)
        reaper.reap_once()
        assert store.pending_deliveries() == 0
        [entry] = store.delivery_attempts(job_id)
        assert entry["outcome"] == "failed" and entry["error"].startswith("expired: not delivered within its retry "
                                                                          "window of 0.25 s")
    finally:
        app.close()


def test_the_courier_gives_up_a_retry_that_would_fall_past_the_deadline(store: JobStore) -> None:
    from worker.courier import Courier

    # Queued 20 s ago (it waited for a courier); the window is 1.3 s: no retry is scheduled.
    settings = Settings(webhook_allow_private=False, webhook_max_attempts=5, webhook_retry_base_s=0.1,
                        webhook_timeout_s=0.1, webhook_resolve_timeout_s=0.1)
    job_id = job_with(store, ["completed"])
    store.request_cancel(job_id)
    token, [msg_id] = store.claim_deliveries(10, 60.0)
    store.redis.hset(store.names.webhook_message(msg_id), "queued", str(int(time.time() * 1000) - 20_000))
    courier = Courier(store, settings)
    try:
        entry = courier.attempt(msg_id, token)
    finally:
        courier.stop()
    assert entry is not None and entry["outcome"] == "failed" and entry["next_attempt_at"] is None
    assert entry["error"].startswith("refused: 127.0.0.1 is a loopback")
    assert "given up: the next attempt would come after the delivery's deadline" in entry["error"]
    assert store.pending_deliveries() == 0 and queued_set(store) == 0


# --- DNS rebinding: the courier connects to the address it checked, and only to it ------------------


class Resolver:
    """A resolver in front of the system's (``socket.getaddrinfo``, which httpx's connections use
    too): each name in ``answers`` gets the next address of its list on each lookup (the last one
    once the list is used up); any other name goes to the system's resolver."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.answers: dict[str, list[str]] = {}
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        with self.lock:
            if name not in self.answers:
                return self.system(host, port, family, type, proto, flags)
            self.asked.append(name)
            queue = self.answers[name]
            address = queue.pop(0) if len(queue) > 1 else queue[0]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    fake = Resolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


class Receiver:
    """An HTTP(S) server on ``host`` recording each request's Host header and path (and, with TLS,
    the SNI name the client sent); answers 200."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.hits: list[tuple[str, str]] = []
        self.sni: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.hits.append((self.headers.get("host", ""), self.path))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a handshake the client broke off (certificate refused)

        self.server = Server((host, port), Handler)
        self.port = int(self.server.server_address[1])
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: receiver.sni.append(name)  # type: ignore[assignment]
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def notified_job(store: JobStore, url: str) -> tuple[str, str]:
    """A job with a ``completed`` webhook to ``url``, cancelled while queued: (job id, delivery id)."""
    notify = Notify.model_validate({"url": url, "events": ["completed"]})
    job_id = store.create_job("key_a", SPEC, queue="cpu", notify=notify).id
    store.request_cancel(job_id)
    return job_id, str(store.redis.zrange(store.names.webhook_due, 0, -1)[0])


def test_a_name_that_rebinds_to_loopback_after_the_check_is_never_connected_to(
    store: JobStore, resolver: Resolver
) -> None:
    from worker.courier import Courier

    local = Receiver()
    # Public to the check; 127.0.0.1 to any later lookup (a rebinding DNS server).
    resolver.answers["hooks.rebind.test"] = ["93.184.215.14", "127.0.0.1"]
    settings = Settings(webhook_allow_private=False, webhook_timeout_s=0.5, webhook_retry_base_s=0.01)
    courier = Courier(store, settings)
    try:
        job_id, msg_id = notified_job(store, f"http://hooks.rebind.test:{local.port}/hook")
        token, [claimed] = store.claim_deliveries(10, 60.0)
        first = courier.attempt(claimed, token)
        assert first is not None and first["outcome"] == "retrying" and first["status_code"] is None
        # It went to the public address it checked (unreachable from here, or no answer), not to us.
        assert "93.184.215.14" in first["error"] and not first["error"].startswith("refused")
        assert local.hits == [] and resolver.asked == ["hooks.rebind.test"]  # one lookup, by the check
        # The retry resolves again: now loopback, refused before any connection.
        time.sleep(0.02)
        token, [again] = store.claim_deliveries(10, 60.0)
        second = courier.attempt(again, token)
        assert second is not None and second["error"].startswith(
            "refused: hooks.rebind.test resolves to 127.0.0.1: 127.0.0.1 is a loopback address")
        assert local.hits == [] and resolver.asked == ["hooks.rebind.test"] * 2
        assert [a["attempt"] for a in store.delivery_attempts(job_id)] == [1, 2] and again == msg_id
    finally:
        courier.stop()
        local.close()


def test_with_allow_private_a_local_receiver_gets_the_delivery_at_the_checked_address_with_its_host(
    store: JobStore, resolver: Resolver
) -> None:
    from worker.courier import Courier

    local = Receiver("127.0.0.1")
    decoy = Receiver("127.0.0.2", local.port)  # where a second lookup would send it
    resolver.answers["hooks.local.test"] = ["127.0.0.1", "127.0.0.2"]
    courier = Courier(store, Settings(webhook_allow_private=True))
    try:
        job_id, _ = notified_job(store, f"http://hooks.local.test:{local.port}/hook?x=1")
        token, [msg_id] = store.claim_deliveries(10, 60.0)
        entry = courier.attempt(msg_id, token)
        assert entry is not None and entry["outcome"] == "delivered" and entry["status_code"] == 200, entry
        assert local.hits == [(f"hooks.local.test:{local.port}", "/hook?x=1")]
        assert decoy.hits == [] and resolver.asked == ["hooks.local.test"]
    finally:
        courier.stop()
        local.close()
        decoy.close()


def test_https_keeps_the_name_for_sni_and_the_certificate_check(
    store: JobStore, resolver: Resolver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.courier import Courier

    ca_file, server_tls = tls_for("hooks.local.test", tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the courier trusts our CA (as an operator's would)
    local = Receiver(tls=server_tls)
    resolver.answers["hooks.local.test"] = ["127.0.0.1"]
    resolver.answers["other.local.test"] = ["127.0.0.1"]  # the same address, a name the certificate lacks
    courier = Courier(store, Settings(webhook_allow_private=True))
    try:
        notified_job(store, f"https://hooks.local.test:{local.port}/tls")
        token, [msg_id] = store.claim_deliveries(10, 60.0)
        entry = courier.attempt(msg_id, token)
        assert entry is not None and entry["outcome"] == "delivered", entry
        assert local.hits == [(f"hooks.local.test:{local.port}", "/tls")] and local.sni == ["hooks.local.test"]
        notified_job(store, f"https://other.local.test:{local.port}/tls")
        token, [msg_id] = store.claim_deliveries(10, 60.0)
        refused = courier.attempt(msg_id, token)
        assert refused is not None and refused["status_code"] is None
        assert "CERTIFICATE_VERIFY_FAILED" in refused["error"]
        assert len(local.hits) == 1 and local.sni[-1] == "other.local.test"
    finally:
        courier.stop()
        local.close()


def tls_for(name: str, folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (its certificate file) and a server context with a certificate for ``name``
    only (no IP address in it) signed by that CA."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, *, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("webhook test CA", ca_key, "webhook test CA", ca_key, ca=True)
    leaf = cert(name, leaf_key, "webhook test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    return folder / "ca.pem", context


def test_pinned_request_keeps_the_urls_name_port_and_path() -> None:
    from worker.courier import pinned_request

    url, headers, extensions = pinned_request("https://Hooks.Example.com:8443/a/b?c=1", "2606:4700::1111")
    assert str(url) == "https://[2606:4700::1111]:8443/a/b?c=1"
    assert headers == {"host": "hooks.example.com:8443"} and extensions == {"sni_hostname": "hooks.example.com"}
    url, headers, extensions = pinned_request("http://hooks.example.com/h", "93.184.215.14")
    assert str(url) == "http://93.184.215.14/h" and headers == {"host": "hooks.example.com"} and extensions == {}


def test_vetted_addresses_resolve_once_in_order_and_refuse_any_private_one(resolver: Resolver) -> None:
    resolver.answers["mixed.test"] = ["93.184.215.14"]
    assert vetted_addresses("http://mixed.test/", allow_private=False, timeout_s=2.0) == ["93.184.215.14"]
    resolver.answers["mixed.test"] = ["10.0.0.8"]
    with pytest.raises(UnsafeUrl, match="mixed.test resolves to 10.0.0.8: 10.0.0.8 is a private address"):
        vetted_addresses("http://mixed.test/", allow_private=False, timeout_s=2.0)
    assert vetted_addresses("http://mixed.test/", allow_private=True, timeout_s=2.0) == ["10.0.0.8"]
    assert resolver.asked == ["mixed.test"] * 3
    with pytest.raises(Unresolvable, match="does not resolve"):
        vetted_addresses("http://no-such-host.invalid/", allow_private=True, timeout_s=5.0)
