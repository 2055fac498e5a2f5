"""Webhooks in the store: signing secrets, deliveries queued by the scripts that write the change,
claims and attempts; the URL policy and the retry schedule (app_common.webhooks)."""

from __future__ import annotations

import json
import time
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
from app_common.webhooks import UnsafeUrl, check_url, delivery_body, forbidden_reason, retry_delay_s

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
