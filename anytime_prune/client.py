"""Python client of the anytime-prune HTTP API, for scripts and pipelines.

    from anytime_prune.client import Client

    client = Client.from_env()                      # or Client("http://host:8000", "ap_...")
    job = client.submit({"dataset": {"name": "digits"}, "architecture": "cnn_small",
                         "stream": {"megabatches": 4}, "training": {"epochs": 3}})
    final = client.watch(job["id"], callback=print)  # follows the live event stream
    paths = client.download(job["id"], "out/")       # sha256 checked against the listing
    client.download_model(job["id"], "out/", max_density=0.5)  # a model kept after a megabatch

Torch-free (httpx, httpx-sse and the standard library only), so it is cheap to import anywhere.
Every non-2xx answer raises :class:`ApiError`, parsed from the API's ``application/problem+json``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from httpx_sse import connect_sse

from anytime_prune.client_errors import ApiError as ApiError
from anytime_prune.client_errors import DatasetInvalid as DatasetInvalid
from anytime_prune.client_errors import DownloadError as DownloadError
from anytime_prune.client_errors import FieldProblem as FieldProblem
from anytime_prune.credentials import config_dir as config_dir
from anytime_prune.credentials import credentials_path as credentials_path
from anytime_prune.credentials import read_credentials as read_credentials
from anytime_prune.credentials import write_credentials as write_credentials
from anytime_prune.upload import Progress, file_chunks, file_digest, multipart_form
from app_common.megabatch_models import megabatch_of
from app_common.public import API_PREFIX

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
DATASET_SETTLED = frozenset({"ready", "invalid"})
ENV_URL = "ANYTIME_PRUNE_URL"
ENV_API_KEY = "ANYTIME_PRUNE_API_KEY"


# --- server-sent events -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: ``id`` is the SSE id (the Redis stream entry id, what
    ``Last-Event-ID`` resumes after), ``type`` the event type, ``data`` the event dict."""

    id: str | None
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal_status(self) -> str | None:
        """The final status when this event ends the job, else None."""
        if self.type == "status_changed" and self.data.get("status") in TERMINAL_STATUSES:
            return str(self.data["status"])
        return None


# --- the client ---------------------------------------------------------------------------------


class Client:
    """The anytime-prune API over HTTP. Thread-safe for separate calls (httpx pools connections);
    use it as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        headers = {"Accept": "application/json", "User-Agent": "anytime-prune-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_env(
        cls, *, environ: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> Client:
        """``ANYTIME_PRUNE_URL`` / ``ANYTIME_PRUNE_API_KEY`` when set, each falling back to the
        credentials file ``anytime-prune serve`` wrote (see :func:`credentials_path`), and the
        URL finally to http://127.0.0.1:8000."""
        env = os.environ if environ is None else environ
        url, key = env.get(ENV_URL), env.get(ENV_API_KEY)
        if not (url and key):
            saved = read_credentials(credentials_path(env)) or {}
            url = url or saved.get("url")
            key = key or saved.get("api_key")
        return cls(url or DEFAULT_URL, key, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, api_key={'***' if self.api_key else None})"

    # --- plumbing -------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "service unreachable", f"{method} {self.base_url}{path}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        # Job ids are hex; quoting keeps a malformed one from changing the route.
        return f"{API_PREFIX}/jobs/{quote(job_id, safe='')}{suffix}"

    # --- jobs -----------------------------------------------------------------------------
    def submit(
        self, spec: Mapping[str, Any] | Any, *, idempotency_key: str | None = None, dataset_id: str | None = None
    ) -> dict[str, Any]:
        """Submit a job (a spec dict or an ``app_common.spec.JobSpec``); returns the job as the
        API answers it (``id``, ``status``, ``urls``...). ``dataset_id`` trains on an uploaded
        dataset (:meth:`upload_dataset`): the API fills in ``dataset.name`` from its format.
        With ``idempotency_key`` a retried submission returns the first job instead of creating
        another."""
        body = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        if dataset_id is not None:
            body["dataset"] = {**(body.get("dataset") or {}), "id": dataset_id}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: dict[str, Any] = self._json("POST", f"{API_PREFIX}/jobs", json=body, headers=headers)
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._json("GET", self._job_path(job_id))
        return job

    def list_page(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the caller's jobs, newest first, and the cursor of the next page."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page = self._json("GET", f"{API_PREFIX}/jobs", params=params)
        return list(page["items"]), page.get("next_cursor")

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        """Every job of the caller, newest first, following the pagination cursors."""
        cursor: str | None = None
        while True:
            items, cursor = self.list_page(status=status, limit=page_size, cursor=cursor)
            yield from items
            if not cursor:
                return

    def list(self, status: str | None = None, limit: int = 20) -> builtins.list[dict[str, Any]]:
        """Up to ``limit`` of the caller's newest jobs (optionally only those with ``status``)."""
        out: builtins.list[dict[str, Any]] = []
        for job in self.iter_jobs(status=status, page_size=min(max(limit, 1), 100)):
            out.append(job)
            if len(out) >= limit:
                break
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop (a queued job is cancelled at once, a running one at its next
        epoch); returns the job afterwards."""
        job: dict[str, Any] = self._json("POST", self._job_path(job_id, "/cancel"))
        return job

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its artifacts."""
        self._request("DELETE", self._job_path(job_id))

    def metrics(self, job_id: str) -> dict[str, Any]:
        """``{"megabatches": [...], "epochs": [...]}``: the per-megabatch and per-epoch history."""
        history: dict[str, Any] = self._json("GET", self._job_path(job_id, "/metrics"))
        return history

    def artifacts(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's files: name, format, bytes, sha256 and a signed ``download_url``."""
        listing = self._json("GET", self._job_path(job_id, "/artifacts"))
        items = listing["items"] if isinstance(listing, dict) else listing
        return list(items)

    def models(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The models kept after each megabatch so far (a running job's too): index, density,
        target_density, test_accuracy, name, bytes, sha256, a signed ``download_url`` and ``files``
        (the model and its manifest, each with a link)."""
        listing: builtins.list[dict[str, Any]] = self._json("GET", self._job_path(job_id, "/models"))
        return listing

    def best_model(
        self, job_id: str, *, max_density: float | None = None, min_accuracy: float | None = None
    ) -> dict[str, Any]:
        """The kept model that suits the bounds, as :meth:`models` lists it: the most accurate with at
        most ``max_density``, the sparsest with at least ``min_accuracy``, or the most accurate within
        both. An :class:`ApiError` 404 (``no-model-qualifies``) when none does."""
        params = {k: v for k, v in (("max_density", max_density), ("min_accuracy", min_accuracy)) if v is not None}
        if not params:
            raise ValueError("give max_density, min_accuracy or both")
        model: dict[str, Any] = self._json("GET", self._job_path(job_id, "/models/best"), params=params)
        return model

    def download_model(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str],
        *,
        megabatch: int | None = None,
        max_density: float | None = None,
        min_accuracy: float | None = None,
    ) -> builtins.list[Path]:
        """Download one kept model, the one of ``megabatch`` or the :meth:`best_model` for the
        bounds, with its manifest into ``dest_dir/megabatch-NNNN/`` (sha256 checked, as
        :meth:`download`); returns their paths. ``app_engine.export.load_model(dest_dir,
        megabatch=N)`` rebuilds it."""
        if megabatch is not None:
            if max_density is not None or min_accuracy is not None:
                raise ValueError("give a megabatch or bounds, not both")
            listing = self.models(job_id)
            model = next((m for m in listing if m["index"] == megabatch), None)
            if model is None:
                kept = ", ".join(str(m["index"]) for m in listing) or "none"
                raise ApiError(404, "Not Found", f"job {job_id} kept no model of megabatch {megabatch} (kept: {kept})")
        else:
            model = self.best_model(job_id, max_density=max_density, min_accuracy=min_accuracy)
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download_one(f, dest) for f in model["files"]]

    def catalog(self) -> dict[str, Any]:
        catalog: dict[str, Any] = self._json("GET", f"{API_PREFIX}/catalog")
        return catalog

    # --- webhooks -------------------------------------------------------------------------
    def webhook_secret(self) -> str:
        """The API key's webhook signing secret (``whsec_...``; created on first use)."""
        return str(self._json("GET", f"{API_PREFIX}/webhooks/secret")["secret"])

    def rotate_webhook_secret(self) -> str:
        """Replace the API key's webhook signing secret; returns the new one."""
        return str(self._json("POST", f"{API_PREFIX}/webhooks/secret/rotate")["secret"])

    def deliveries(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's webhook delivery attempts, oldest first (the newest 200; one page): time,
        event, webhook_id, attempt, status_code, error, outcome (delivered | retrying | failed),
        next_attempt_at and, for ``job.megabatch``, megabatch. A delivery given up at its deadline
        ends with a ``failed`` entry whose error starts with ``expired:``."""
        listing: dict[str, builtins.list[dict[str, Any]]] = self._json("GET", self._job_path(job_id, "/deliveries"))
        return listing["items"]

    # --- datasets -------------------------------------------------------------------------
    @staticmethod
    def _dataset_path(dataset_id: str, suffix: str = "") -> str:
        return f"{API_PREFIX}/datasets/{quote(dataset_id, safe='')}{suffix}"

    def upload_dataset(
        self, path: str | os.PathLike[str], format: str = "npz", name: str | None = None, *,  # noqa: A002
        progress: Progress | None = None, wait: bool = True, timeout_s: float = 1800.0, poll_s: float = 1.0,
    ) -> dict[str, Any]:
        """Upload a dataset file (``format``: npz, cifar10, cifar100 or imagefolder; see the
        README) and return its record once validation made it ``ready`` (with ``wait=False``:
        as soon as the bytes are in). The file is streamed from disk, never read whole: straight
        to the object store when the service offers a presigned POST, else through the API.
        ``progress(sent, total)`` follows the bytes. Raises :class:`DatasetInvalid` with the
        validator's reason when the file is refused, :class:`TimeoutError` after ``timeout_s``.
        An upload that fails midway deletes its record, so no half-uploaded dataset is left."""
        file = Path(path)
        digest = file_digest(file)
        body = {"format": format, "name": name or file.name[:200], "sha256": digest.sha256, "bytes": digest.bytes}
        record: dict[str, Any] = self._json("POST", f"{API_PREFIX}/datasets", json=body)
        try:
            record = self._send_content(record, file, digest.bytes, progress)
        except BaseException:
            with contextlib.suppress(ApiError):
                self.delete_dataset(record["id"])
            raise
        return self.wait_dataset(record["id"], timeout_s=timeout_s, poll_s=poll_s) if wait else record

    def _send_content(
        self, record: Mapping[str, Any], file: Path, size: int, progress: Progress | None
    ) -> dict[str, Any]:
        # Sending a large file can take long; the answer comes once the store has it all.
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 300.0))
        post = (record.get("upload") or {}).get("post")
        if post:
            form = multipart_form(post.get("fields") or {}, file, filename=file.name)
            request = self._http.build_request(
                "POST", str(post["url"]), content=form.chunks(progress), timeout=timeout,
                headers={"Content-Type": form.content_type, "Content-Length": str(form.length)},
            )
            # The store's signed form is the credential: the API key must not travel there.
            request.headers.pop("Authorization", None)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                raise ApiError(0, "object store unreachable", f"POST {post['url']}: {exc}") from exc
            if response.status_code >= 400:
                raise ApiError.from_response(response)
            done: dict[str, Any] = self._json("POST", self._dataset_path(record["id"], "/complete"))
            return done
        sent: dict[str, Any] = self._json(
            "PUT", self._dataset_path(record["id"], "/content"), content=file_chunks(file, progress=progress),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}, timeout=timeout,
        )
        return sent

    def wait_dataset(self, dataset_id: str, *, timeout_s: float = 1800.0, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until validation settles: the ``ready`` record, or :class:`DatasetInvalid`."""
        deadline = time.monotonic() + timeout_s
        delay = min(0.2, poll_s)
        while True:
            record = self.get_dataset(dataset_id)
            if record["status"] == "invalid":
                raise DatasetInvalid(record)
            if record["status"] in DATASET_SETTLED:
                return record
            if time.monotonic() >= deadline:
                raise TimeoutError(f"dataset {dataset_id} is still {record['status']} after {timeout_s} s")
            time.sleep(delay)
            delay = min(poll_s, delay * 2)

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        record: dict[str, Any] = self._json("GET", self._dataset_path(dataset_id))
        return record

    def list_datasets(self, status: str | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Up to ``limit`` of the caller's datasets, following the pagination cursors."""
        out: builtins.list[dict[str, Any]] = []
        cursor: str | None = None
        while len(out) < limit:
            params: dict[str, Any] = {"limit": min(max(limit - len(out), 1), 100)}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._json("GET", f"{API_PREFIX}/datasets", params=params)
            out += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return out[:limit]

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete the dataset and its stored bytes (refused, 409, while a job uses it)."""
        self._request("DELETE", self._dataset_path(dataset_id))

    # --- events ---------------------------------------------------------------------------
    def events(
        self,
        job_id: str,
        last_event_id: str | None = None,
        *,
        max_retries: int = 8,
        stop_at_terminal: bool = True,
    ) -> Iterator[JobEvent]:
        """The job's events, live, oldest first (after ``last_event_id`` when given).

        A dropped connection is resumed with ``Last-Event-ID`` so no event is lost or repeated;
        ``max_retries`` consecutive failed reconnects raise :class:`ApiError`. The iterator ends
        after the event that makes the job terminal (or when the server ends a stream of a job
        that is over).
        """
        last = last_event_id
        failures = 0
        # The server sends a comment at least every heartbeat (10 s by default); a read silent for
        # much longer than that means the connection is dead, so reconnect.
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))
        while True:
            headers: dict[str, str] = {}  # connect_sse adds Accept and Cache-Control
            if last:
                headers["Last-Event-ID"] = last
            ended_cleanly = False
            try:
                with connect_sse(
                    self._http, "GET", self._job_path(job_id, "/events"), headers=headers, timeout=timeout
                ) as source:
                    response = source.response
                    if response.status_code >= 400:
                        response.read()
                        error = ApiError.from_response(response)
                        if response.status_code < 500:
                            raise error
                        raise _Retryable(str(error), error.retry_after)
                    for sse in source.iter_sse():
                        # httpx-sse dispatches at every blank line once an id was seen (the id
                        # persists, as the standard says), so heartbeats arrive as events without
                        # data; the standard dispatches only messages with data.
                        if not sse.data:
                            continue
                        if sse.event == "error":
                            # The server lost its store mid-stream; reconnecting resumes it.
                            raise _Retryable(f"server: {sse.data}", None)
                        event = JobEvent(sse.id or None, sse.event, _decode_data(sse.data))
                        if sse.id:
                            last = sse.id
                        failures = 0
                        yield event
                        if stop_at_terminal and event.terminal_status:
                            return
                    ended_cleanly = True
            # httpx_sse.SSEError (a 200 answer that is not an event stream) is a TransportError.
            except (httpx.TransportError, _Retryable) as exc:
                failures += 1
                if failures > max_retries:
                    raise ApiError(0, "event stream lost", f"job {job_id}: {exc}") from exc
                delay = min(10.0, 0.5 * 2 ** (failures - 1))
                if isinstance(exc, _Retryable) and exc.retry_after:
                    delay = max(delay, exc.retry_after)
                log.info("event stream of %s interrupted (%s); resuming after %s in %.1fs", job_id, exc, last, delay)
                time.sleep(delay)
                continue
            if ended_cleanly:
                # The server ends the stream once the job is over; a stream cut short by a proxy
                # also ends cleanly, so ask before resuming.
                if self.status(job_id)["status"] in TERMINAL_STATUSES:
                    return
                failures += 1
                if failures > max_retries:
                    raise ApiError(0, "event stream lost", f"job {job_id}: the stream keeps ending early")
                time.sleep(min(10.0, 0.5 * 2 ** (failures - 1)))

    def watch(
        self, job_id: str, callback: Callable[[JobEvent], None] | None = None, *, max_retries: int = 8
    ) -> dict[str, Any]:
        """Follow the job's events until it is terminal (calling ``callback`` with each event)
        and return the final job."""
        for event in self.events(job_id, max_retries=max_retries):
            if callback is not None:
                callback(event)
        job = self.status(job_id)
        # The stream ends with the terminal event, which is written in the same atomic step as
        # the status, so the record is terminal by now; poll briefly to be safe against proxies.
        deadline = time.monotonic() + 5.0
        while job["status"] not in TERMINAL_STATUSES and time.monotonic() < deadline:
            time.sleep(0.2)
            job = self.status(job_id)
        return job

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the job is terminal (an alternative to :meth:`watch` where SSE is blocked)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    # --- artifacts ------------------------------------------------------------------------
    def download(
        self, job_id: str, dest_dir: str | os.PathLike[str], names: builtins.list[str] | None = None
    ) -> builtins.list[Path]:
        """Download the job's artifacts (all, or ``names``) into ``dest_dir``; returns their paths.
        The models kept after each megabatch are not among them: see :meth:`download_model`.

        Each file is streamed to a temporary file, its size and sha256 compared with the listing,
        and only then renamed into place; a mismatch raises :class:`DownloadError` and leaves no
        file behind.
        """
        listing = {a["name"]: a for a in self.artifacts(job_id)}
        wanted = list(listing) if names is None else list(names)
        missing = [n for n in wanted if n not in listing]
        if missing:
            raise ApiError(404, "Not Found", f"job {job_id} has no artifact {', '.join(missing)}; "
                           f"it has {', '.join(sorted(listing)) or 'none'}")
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download_one(listing[name], dest) for name in wanted]

    def _download_one(self, artifact: Mapping[str, Any], dest: Path) -> Path:
        name = str(artifact["name"])
        # A plain file name, or one of a megabatch's files in its folder (nothing else with a folder).
        if megabatch_of(name) is None and (Path(name).name != name or name in ("", ".", "..")):
            raise DownloadError(0, "bad artifact name", f"refusing to write {name!r} outside {dest}")
        url = httpx.URL(self.base_url).join(str(artifact["download_url"]))
        # The link is signed and needs no key; the key must not leak to another host (an object
        # store or CDN behind a public_base_url), so such links go through a client without it.
        same_host = urlsplit(str(url)).netloc == urlsplit(self.base_url).netloc
        http = self._http if same_host else httpx.Client(timeout=self.timeout)
        target = dest / name
        target.parent.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                try:
                    with http.stream("GET", url) as response:
                        if response.status_code >= 400:
                            response.read()
                            raise ApiError.from_response(response)
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            size += len(chunk)
                            fh.write(chunk)
                except httpx.TransportError as exc:
                    raise ApiError(0, "service unreachable", f"downloading {name}: {exc}") from exc
            expected_size, expected_sha = int(artifact["bytes"]), str(artifact["sha256"]).lower()
            if size != expected_size or digest.hexdigest() != expected_sha:
                raise DownloadError(
                    0,
                    "checksum mismatch",
                    f"{name}: got {size} bytes with sha256 {digest.hexdigest()}, "
                    f"the listing says {expected_size} bytes with sha256 {expected_sha}",
                )
            # mkstemp made it private (0600); a downloaded model is an ordinary file.
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if http is not self._http:
                http.close()
        log.info("downloaded %s (%d bytes)", target, size)
        return target


class _Retryable(Exception):
    """An interruption of the event stream worth reconnecting after."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


def _decode_data(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        return {"raw": data}
    return value if isinstance(value, dict) else {"value": value}
