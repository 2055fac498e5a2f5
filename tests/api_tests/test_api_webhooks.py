"""The webhook routes: the key's signing secret, a job's delivery attempts, and the refusal of
webhook URLs that reach private addresses (422 naming notify.url) unless the server allows them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from api_support import SMALL, Api, assert_problem, make_api
from standardwebhooks import Webhook

from app_common.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[Api]:
    """An API with the production default: webhooks to public addresses only."""
    async for value in make_api(settings.model_copy(update={"webhook_allow_private": False})):
        yield value


async def test_secret_per_key_stable_and_rotated(api: Api) -> None:
    r = await api.client.get("/api/v1/webhooks/secret", headers=api.a)
    assert r.status_code == 200, r.text
    secret = r.json()["secret"]
    assert secret.startswith("whsec_") and set(r.json()) == {"secret"}
    Webhook(secret)
    again = await api.client.get("/api/v1/webhooks/secret", headers=api.a)
    assert again.json()["secret"] == secret
    other = await api.client.get("/api/v1/webhooks/secret", headers=api.b)
    assert other.json()["secret"] != secret
    rotated = await api.client.post("/api/v1/webhooks/secret/rotate", headers=api.a)
    assert rotated.status_code == 200 and rotated.json()["secret"] not in (secret, other.json()["secret"])
    now = await api.client.get("/api/v1/webhooks/secret", headers=api.a)
    assert now.json() == rotated.json()
    assert (await api.client.get("/api/v1/webhooks/secret", headers=api.b)).json() == other.json()


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/webhooks/secret"),
                                              ("POST", "/api/v1/webhooks/secret/rotate")])
async def test_secret_routes_need_a_key(api: Api, method: str, path: str) -> None:
    assert_problem(await api.client.request(method, path), 401)
    assert_problem(await api.client.request(method, path, headers={"Authorization": "Bearer nope"}), 401)


async def test_deliveries_list_the_attempts_to_the_owner_only(api: Api) -> None:
    job = await api.submit({**SMALL, "notify": {"url": "http://127.0.0.1:9/hook"}})
    r = await api.client.get(f"/api/v1/jobs/{job['id']}/deliveries", headers=api.a)
    assert r.status_code == 200 and r.json() == {"items": []}
    # Cancelled while queued: completed, queued for delivery; a courier's attempt, as the store records it.
    assert (await api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.a)).status_code == 200
    token, [msg_id] = api.store.claim_deliveries(10, 60.0)
    delivery = api.store.get_delivery(msg_id)
    assert delivery is not None
    attempt = {"time": "2026-12-01T00:00:00.000Z", "event": "job.completed", "webhook_id": msg_id, "attempt": 1,
               "status_code": None, "error": "timed out after 10 s", "outcome": "retrying",
               "next_attempt_at": "2026-12-01T00:00:05.000Z"}
    assert api.store.finish_attempt(delivery, token, attempt, body="{}", next_at_ms=0)
    r = await api.client.get(f"/api/v1/jobs/{job['id']}/deliveries", headers=api.a)
    assert r.status_code == 200 and r.json() == {"items": [{**attempt, "megabatch": None}]}
    assert_problem(await api.client.get(f"/api/v1/jobs/{job['id']}/deliveries", headers=api.b), 404)
    assert_problem(await api.client.get("/api/v1/jobs/0123/deliveries", headers=api.a), 404)
    assert (await api.client.delete(f"/api/v1/jobs/{job['id']}", headers=api.a)).status_code == 204
    assert api.store.delivery_attempts(job["id"]) == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/hook", "http://10.0.0.7/hook", "https://192.168.1.20/", "http://169.254.169.254/latest",
     "http://[::1]:9000/", "http://0.0.0.0/", "http://[::ffff:10.0.0.1]/", "http://100.64.1.1/", "http://224.0.0.5/",
     "http://localhost:8000/hook", "http://no-such-host.invalid/hook"],
)
async def test_private_or_unresolvable_urls_are_refused(strict: Api, url: str) -> None:
    r = await strict.client.post("/api/v1/jobs", json={**SMALL, "notify": {"url": url}}, headers=strict.a)
    body = assert_problem(r, 422)
    assert [e["field"] for e in body["errors"]] == ["notify.url"], body
    assert strict.queue_length() == 0


async def test_public_addresses_are_accepted_and_allow_private_skips_the_check(strict: Api, api: Api) -> None:
    job = await strict.submit({**SMALL, "notify": {"url": "https://93.184.215.14:8443/hook"}})
    assert job["notify"]["url"] == "https://93.184.215.14:8443/hook"
    job = await api.submit({**SMALL, "notify": {"url": "http://127.0.0.1:8080/hook", "events": ["megabatch"]}})
    assert job["notify"] == {"url": "http://127.0.0.1:8080/hook", "events": ["megabatch"]}


async def test_a_delivery_given_up_at_its_deadline_shows_why(api: Api) -> None:
    """No courier ran: the delivery expires (short window) and its history says so."""
    job = await api.submit({**SMALL, "notify": {"url": "http://127.0.0.1:9/hook"}})
    assert (await api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.a)).status_code == 200
    await anyio.sleep(0.06)
    [msg_id] = api.store.expire_deliveries(0.05)
    r = await api.client.get(f"/api/v1/jobs/{job['id']}/deliveries", headers=api.a)
    assert r.status_code == 200, r.text
    [entry] = r.json()["items"]
    assert entry["webhook_id"] == msg_id and entry["event"] == "job.completed"
    assert entry["outcome"] == "failed" and entry["attempt"] == 0 and entry["status_code"] is None
    assert entry["error"].startswith("expired: not delivered within its retry window of 0.05 s")
    assert entry["next_attempt_at"] is None and api.store.pending_deliveries() == 0
