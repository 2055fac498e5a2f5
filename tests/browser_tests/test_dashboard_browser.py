"""The dashboard in a real Chromium against a real ``anytime-prune serve``: sign in, submit from the
form, watch the accuracy curve gain a point at each megabatch without a reload, a field error for an
invalid sparsity, cancel a running job, download the sparse model (sha256 checked), compare two jobs,
sign out when the key is revoked while a job page is open, and every page at 1280x800 and 390x844
loading nothing from any host but the API's.

Jobs are tiny (digits, mlp, one epoch per megabatch); one server and one browser serve the module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dashboard_support import DESKTOP, PHONE, Serve, Tab, open_tab, sign_in

from anytime_prune.credentials import credentials_path, read_credentials
from app_common.spec import JobSpec
from app_common.store import JobStore, make_redis

pytestmark = pytest.mark.browser

TINY = {"dataset": {"name": "digits"}, "architecture": "mlp", "sparsity": {"target": 0.5},
        "stream": {"megabatches": 2}, "training": {"epochs": 1, "precision": "fp32", "seed": 3}}
# Hang guard for a tiny job: seconds each, minutes allowed.
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def submitted_pair(serve: Serve) -> list[str]:
    """Two jobs on the same data, app and dense, submitted when the server starts: the worker runs
    them while the first tests use the browser."""
    with serve.client() as client:
        return [client.submit({**TINY, "method": method})["id"] for method in ("app", "dense")]


@pytest.fixture(scope="module")
def uploaded_dataset(serve: Serve, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small npz uploaded through the datasets API (validated by the control worker meanwhile)."""
    import numpy as np

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(90, 8)).astype(np.float32), np.repeat(np.arange(3), 30)
    path = tmp_path_factory.mktemp("upload") / "blobs.npz"
    np.savez(path, x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    with serve.client() as client:
        return str(client.upload_dataset(path, "npz", name="browser blobs", wait=False)["id"])


@pytest.fixture(autouse=True)
def _pair_first(submitted_pair: list[str], uploaded_dataset: str) -> None:
    """Every test of the module starts after the pair and the upload were sent (the first one sends them)."""


@pytest.fixture(scope="module")
def finished_pair(serve: Serve, submitted_pair: list[str]) -> Iterator[list[str]]:
    """The pair, finished."""
    with serve.client() as client:
        for job_id in submitted_pair:
            assert client.wait(job_id, timeout=JOB_TIMEOUT_S)["status"] == "succeeded", serve.output()
    yield submitted_pair


def api_requests(tab: Tab) -> list[Any]:
    return [r for r in tab.requests if urlsplit(r.url).path.startswith("/api/v1/")]


def test_sign_in_sends_the_key_as_a_bearer_header_never_in_a_url(tab: Tab, serve: Serve) -> None:
    page = tab.page
    page.goto(serve.url + "/")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in-button")
    page.wait_for_selector("#api-key-error:not(:empty)")
    assert "refused" in page.inner_text("#api-key-error")
    assert page.get_attribute("#api-key", "aria-invalid") == "true"

    # By keyboard alone: the field has the focus after a failed try; Enter submits.
    key = serve.api_key
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.press("Control+A")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#jobs-updated:not(:empty)")
    assert page.evaluate("sessionStorage.getItem('anytime-prune.api-key')") == key
    assert page.evaluate("localStorage.length") == 0
    page.reload()  # the tab keeps its key
    page.wait_for_selector("#jobs-updated:not(:empty)")
    calls = api_requests(tab)
    assert calls
    assert all(key not in r.url for r in tab.requests)
    signed = [r for r in calls if r.headers.get("authorization") == f"Bearer {key}"]
    assert len(signed) >= 2  # the list after sign-in and after the reload

    page.click("#sign-out")
    page.wait_for_selector("#api-key")
    assert page.evaluate("sessionStorage.getItem('anytime-prune.api-key')") is None


def test_an_invalid_sparsity_shows_the_servers_reason_next_to_the_field(
    tab: Tab, serve: Serve, uploaded_dataset: str
) -> None:
    page = tab.page
    sign_in(tab, serve)
    with serve.client() as client:
        before = len(client.list(limit=100))
        assert client.wait_dataset(uploaded_dataset, timeout_s=JOB_TIMEOUT_S)["status"] == "ready"
    page.click("nav a[data-nav=submit]")
    page.wait_for_selector("#submit-form")
    # The form offers what the catalog names, and the key's ready uploads.
    options = page.eval_on_selector_all("#f-dataset option", "els => els.map(e => e.value)")
    assert {"name:digits", f"id:{uploaded_dataset}", "path:npz"} <= set(options)
    assert "mlp" in page.eval_on_selector_all("#f-arch option", "els => els.map(e => e.value)")
    page.select_option("#f-dataset", "path:npz")
    assert page.is_visible("#f-path")
    page.select_option("#f-dataset", "name:digits")
    assert page.is_hidden("#f-path")
    page.check("#kind-tau")
    assert page.is_visible("#f-tau") and page.is_hidden("#f-target")
    page.check("#kind-target")
    page.fill("#f-target", "1.5")
    page.click("#submit-job")
    error = page.wait_for_selector("#f-target-error:not(:empty)")
    assert "less than 1" in error.inner_text()
    assert page.get_attribute("#f-target", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-target"  # focus moves to the field
    assert "f-target-error" in (page.get_attribute("#f-target", "aria-describedby") or "")
    with serve.client() as client:
        assert len(client.list(limit=100)) == before


def test_the_event_stream_parser_reassembles_messages_split_anywhere(tab: Tab, serve: Serve) -> None:
    """The page reads SSE from fetch() chunks: line ends split across chunks (CR, LF, CRLF),
    multi-line data, comments (heartbeats) and retry are parsed as the SSE standard says."""
    page = tab.page
    page.goto(serve.url + "/")
    got = page.evaluate("""async () => {
        const {sseMessages} = await import('./dashboard/sse.js');
        const chunks = ['retry: 2500\\r', '\\n\\r\\nid: 1-0\\nevent: pruned\\ndata: {"a":', '1}\\n',
                        '\\n: heartbeat\\n\\nid: 2-0\\r\\ndata: x\\r\\ndata:y\\r', '\\n\\r\\ndata: tail-without-end'];
        const body = new ReadableStream({start(c) {
            for (const chunk of chunks) c.enqueue(new TextEncoder().encode(chunk));
            c.close();
        }});
        const state = {}, comments = [], messages = [];
        for await (const m of sseMessages(body, state, (c) => comments.push(c))) messages.push(m);
        return {messages, state, comments};
    }""")
    assert got["messages"] == [{"id": "1-0", "event": "pruned", "data": '{"a":1}'},
                               {"id": "2-0", "event": "message", "data": "x\ny"}]
    assert got["state"] == {"retry": 2500, "lastId": "2-0"}
    assert got["comments"] == [" heartbeat"]


def test_submit_from_the_form_watch_the_curves_grow_live_and_download_the_sparse_model(
    tab: Tab, serve: Serve
) -> None:
    page = tab.page
    sign_in(tab, serve)
    page.click("nav a[data-nav=submit]")
    page.wait_for_selector("#submit-form")
    page.select_option("#f-dataset", "name:digits")
    page.select_option("#f-arch", "mlp")
    page.select_option("#f-method", "app")
    page.fill("#f-target", "0.5")
    page.fill("#f-megabatches", "4")
    page.fill("#f-epochs", "1")
    page.fill("#f-seed", "3")
    page.evaluate("window.__samePage = true")
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#megabatch-charts")
    # Record the number of points of the accuracy curve each time the charts change.
    page.evaluate("""() => {
        window.__counts = [];
        const count = () => document.querySelectorAll(
            '[data-chart=accuracy] [data-series=test_accuracy] .pt').length;
        const record = () => { const n = count(); if (window.__counts.at(-1) !== n) window.__counts.push(n); };
        new MutationObserver(record).observe(document.getElementById('megabatch-charts'),
            {childList: true, subtree: true});
        record();
    }""")
    page.wait_for_selector("#job-status [data-status=succeeded]", timeout=JOB_TIMEOUT_S * 1000)
    # (Waits use selectors: the page's CSP forbids the eval behind wait_for_function's polling.)
    page.wait_for_selector("[data-chart=accuracy] [data-series=test_accuracy][data-points='4']")
    counts = page.evaluate("window.__counts")
    assert page.evaluate("window.__samePage") is True  # no reload happened
    # One point more at each megabatch, the first ones drawn while the page watched.
    assert counts == list(range(counts[0], 5)) and counts[0] < 4, counts
    assert page.locator("#event-log li[data-type=megabatch_ended]").count() == 4
    assert page.locator("#layer-density .bar").count() >= 2
    assert page.locator("[data-chart=density] [data-series=density] .pt").count() == 4
    assert page.locator("[data-chart=loss] [data-series=train_loss] .pt").count() == 4
    page.wait_for_selector("#stream-state:has-text('finished')")

    with serve.client() as client:
        listed = {a["name"]: a for a in client.artifacts(job_id)}
    link = page.wait_for_selector('#artifacts a[data-artifact="model.sparse.safetensors"]')
    assert page.locator("#artifacts a[data-artifact]").count() == len(listed)
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.suggested_filename == "model.sparse.safetensors"
    digest = hashlib.sha256(Path(download.path()).read_bytes()).hexdigest()
    assert digest == listed["model.sparse.safetensors"]["sha256"]
    assert digest in page.inner_text("#artifacts")

    # Every megabatch's model, where the server lists them (GET .../models); otherwise no table.
    response = page.request.get(f"{serve.url}/api/v1/jobs/{job_id}/models",
                                headers={"Authorization": f"Bearer {serve.api_key}"})
    if response.ok:
        kept = {m["index"]: m for m in response.json()}
        assert sorted(kept) == [1, 2, 3, 4]
        page.wait_for_selector("#models-table tbody tr:nth-child(4)")
        with page.expect_download() as download_info:
            page.click('#models-table a[data-model="2"]')
        digest = hashlib.sha256(Path(download_info.value.path()).read_bytes()).hexdigest()
        assert digest == kept[2]["sha256"]
    else:  # a server without the route: no table, no error
        assert response.status == 404
        assert page.locator("#models-table").count() == 0


def test_the_list_filters_by_status_and_pages_with_the_cursor(tab: Tab, serve: Serve, finished_pair: list[str]) -> None:
    page = tab.page
    sign_in(tab, serve)
    page.select_option("#status-filter", "succeeded")
    page.wait_for_url("**/#/jobs?status=succeeded")
    page.wait_for_selector(f"#pick-{finished_pair[0]}")
    statuses = page.eval_on_selector_all("#jobs-table tbody [data-status]", "els => els.map(e => e.dataset.status)")
    assert statuses and set(statuses) == {"succeeded"}
    page.select_option("#status-filter", "cancelled")
    page.wait_for_selector(".empty-note", state="visible")  # none cancelled yet
    assert page.locator("#jobs-table tbody tr").count() == 0

    # One job a page: newest first, "Older" follows the API's next_cursor, "Newer" goes back.
    page.goto(f"{serve.url}/#/jobs?limit=1")
    newest, older = finished_pair[1], finished_pair[0]
    with serve.client() as client:
        assert [j["id"] for j in client.list(limit=100)][-2:] == [newest, older]  # the first two jobs
    page.wait_for_selector("#jobs-table tbody tr")
    first = page.get_attribute("#jobs-table tbody tr", "data-job")
    seen = [first]
    while page.is_enabled("#page-older"):
        page.click("#page-older")
        page.wait_for_selector(f"#jobs-table tbody tr:first-child:not([data-job='{seen[-1]}'])")
        seen.append(page.get_attribute("#jobs-table tbody tr", "data-job"))
    assert seen[-2:] == [newest, older] and len(seen) == len(set(seen))
    page.click("#page-newer")
    page.wait_for_selector(f"#jobs-table tbody tr:first-child[data-job='{seen[-2]}']")


def test_compare_two_jobs(tab: Tab, serve: Serve, finished_pair: list[str]) -> None:
    page = tab.page
    sign_in(tab, serve)
    for job_id in finished_pair:
        page.check(f"#pick-{job_id}")
    page.click("#compare-selected")
    page.wait_for_selector("#compare-table tbody tr")
    assert page.locator("#compare-table tbody tr").count() == 2
    rows = {r.get_attribute("data-job"): r for r in page.query_selector_all("#compare-table tbody tr")}
    with serve.client() as client:
        for job_id in finished_pair:
            result = client.status(job_id)["result"]
            row = rows[job_id]
            assert row.query_selector("[data-value=cer]").inner_text() == str(result["cer"])
            assert row.query_selector("[data-value=density]").inner_text().startswith(
                f"{result['final_density'] * 100:.1f}")
    for job_id in finished_pair:  # one line each on the overlaid accuracy chart, 2 megabatches each
        assert page.locator(f"[data-chart=compare-accuracy] [data-series='{job_id}'] .pt").count() == 2
    assert page.locator("[data-chart=compare-accuracy] .legend li").count() == 2


def test_the_list_shows_a_new_job_without_reload_and_its_page_cancels_it(tab: Tab, serve: Serve) -> None:
    page = tab.page
    sign_in(tab, serve)
    page.evaluate("window.__samePage = true")
    long_spec = {**TINY, "stream": {"megabatches": 6}, "training": {"epochs": 30, "precision": "fp32", "seed": 3}}
    with serve.client() as client:
        job_id = client.submit(long_spec)["id"]
        # The list polls: the job appears, then turns running, with no reload.
        row = f"#jobs-table tr[data-job='{job_id}']"
        page.wait_for_selector(f"{row} [data-status=running]", timeout=JOB_TIMEOUT_S * 1000)
        page.click(f"{row} a[href='#/jobs/{job_id}']")
        page.wait_for_selector("#event-log li[data-type=epoch_ended]", timeout=JOB_TIMEOUT_S * 1000)
        page.click("#cancel-job")
        page.wait_for_selector("#job-status [data-status=cancelled]", timeout=JOB_TIMEOUT_S * 1000)
        assert client.status(job_id)["status"] == "cancelled"
    assert page.evaluate("window.__samePage") is True
    assert page.locator("#cancel-job").is_hidden()
    assert page.locator("#event-log li[data-type=status_changed]").count() >= 2


def test_a_key_revoked_while_its_job_page_is_open_signs_the_page_out(tab: Tab, serve: Serve) -> None:
    """The page follows a job's live events; its key is revoked: the server ends the open stream,
    the page's reconnection is refused (401), and the page goes back to sign-in saying why and
    stops following (no further request)."""
    creds = read_credentials(credentials_path({"HOME": str(serve.home)}))
    assert creds is not None
    store = JobStore(make_redis(creds["redis_url"]), prefix=creds.get("redis_prefix") or "app")
    owner, secret = store.create_key("revoked while watching")
    # Only the job's record, never queued for the worker: it stays queued and its stream open.
    spec = JobSpec.model_validate({**TINY, "method": "app"}).to_dict()
    job_id = store.create_job(owner, spec, queue="cpu").id
    try:
        page = tab.page
        page.goto(serve.url + "/")
        page.fill("#api-key", secret)
        page.click("#sign-in-button")
        page.wait_for_selector("#jobs-updated:not(:empty)")
        page.goto(f"{serve.url}/#/jobs/{job_id}")
        page.wait_for_selector("#stream-state:has-text('live')")
        assert store.revoke_key(owner)
        error = page.wait_for_selector("#api-key-error:not(:empty)")
        assert "Signed out" in error.inner_text() and "revoked" in error.inner_text()
        assert page.evaluate("sessionStorage.getItem('anytime-prune.api-key')") is None
        streams = [r for r in tab.requests if urlsplit(r.url).path == f"/api/v1/jobs/{job_id}/events"]
        # The first stream (ended by the server) and the refused reconnection; nothing after it.
        assert len(streams) == 2 and streams[-1].response().status == 401
        assert not [r for r in tab.requests[tab.requests.index(streams[-1]) + 1:]
                    if urlsplit(r.url).path.startswith("/api/v1/")]
    finally:
        store.request_cancel(job_id)
        store.delete_job(job_id)
        store.close()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_every_page_loads_only_from_the_api_host_at_both_sizes(
    browser: Any, serve: Serve, finished_pair: list[str], viewport: dict[str, int], tmp_path: Path
) -> None:
    context, tab = open_tab(browser, viewport)
    page = tab.page
    size = f"{viewport['width']}x{viewport['height']}"
    shots = []

    def shot(name: str) -> None:
        path = tmp_path / f"dashboard-{name}-{size}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)
        # At each size the page fits the window's width (no sideways scrolling).
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], name

    try:
        page.goto(serve.url + "/")
        page.wait_for_selector("#api-key")
        shot("sign-in")
        sign_in(tab, serve)
        page.wait_for_selector(f"#pick-{finished_pair[0]}")
        shot("jobs")
        page.click("nav a[data-nav=submit]")
        page.wait_for_selector("#submit-form")
        shot("submit")
        page.goto(f"{serve.url}/#/jobs/{finished_pair[0]}")
        page.wait_for_selector("#artifacts")
        page.wait_for_selector("#stream-state:has-text('finished')")
        shot("job")
        page.goto(f"{serve.url}/#/compare?ids={','.join(finished_pair)}")
        page.wait_for_selector("#compare-table tbody tr")
        shot("compare")
        page.goto(f"{serve.url}/#/compare")
        page.wait_for_selector("#compare-picker input[type=checkbox]")
    finally:
        context.close()
    for path in shots:
        print(f"screenshot: {path}")
    api = urlsplit(serve.url)
    foreign = [r.url for r in tab.requests
               if urlsplit(r.url).scheme not in ("data", "blob")
               and (urlsplit(r.url).scheme, urlsplit(r.url).netloc) != (api.scheme, api.netloc)]
    assert not foreign, foreign
    assert len({urlsplit(r.url).path for r in tab.requests}) > 10  # the pages did load their parts
    assert not tab.errors, tab.errors
    assert not [c for c in tab.console if "Content Security Policy" in c], tab.console
