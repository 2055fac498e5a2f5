"""The FastAPI application factory.

    uvicorn --factory api.main:create_app

builds the settings from the environment; tests and ``anytime-prune serve`` pass their own.
Everything lives under ``/api/v1`` except ``/healthz``, ``/readyz``, ``/metrics``, ``/docs``,
``/openapi.json`` and the dashboard (``/`` and its files under ``/dashboard/``).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api import access_log
from api.dashboard import install_dashboard
from api.docs import install_docs
from api.errors import PROBLEM_MEDIA_TYPE, install_error_handlers
from api.metrics import ApiMetrics
from api.middleware import BodySizeLimitMiddleware, HeadBodyMiddleware, JsonBodyMiddleware, RequestMetricsMiddleware
from api.queue import create_celery
from api.ratelimit import SubmitRateLimit
from api.routes import artifacts, catalog, datasets, health, jobs, models, webhooks
from api.sse import event_stream_openapi, stream_pool, stream_slots
from app_common.public import API_PREFIX
from app_common.settings import Settings
from app_common.store import JobStore, make_redis

log = logging.getLogger(__name__)



def _version() -> str:
    try:
        return version("anytime-prune")
    except PackageNotFoundError:
        return "0.0.0+local"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API wired to ``settings`` (read from the environment when None)."""
    settings = settings or Settings()
    access_log.install()  # signed links never reach the access log
    if not settings.redis_url:
        raise ValueError("settings.redis_url is required (anytime-prune serve starts an embedded Redis)")
    client = make_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
    store = JobStore(client, prefix=settings.redis_prefix, events_maxlen=settings.events_maxlen)
    celery_app = create_celery(settings)
    # Event streams borrow from one bounded pool (not a client each: 1,000 streams were 1,039 clients).
    streams = stream_pool(settings.redis_url, max_connections=settings.sse_redis_connections,
                          block_s=settings.sse_heartbeat_s, timeout_s=settings.redis_timeout_s,
                          prefix=settings.redis_prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        celery_app.close()
        client.close()
        await streams.aclose()

    app = FastAPI(
        title="anytime-prune",
        version=_version(),
        summary="Train sparse networks with Anytime Progressive Pruning.",
        description="Submit a job spec, follow its events, read its metrics, download the pruned model. "
        "Errors are `application/problem+json`.",
        docs_url=None,  # served from local assets by api.docs (the default page needs a CDN)
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    install_docs(app)
    install_dashboard(app)  # the browser UI at / (static files, not in the OpenAPI document)
    app.state.settings = settings
    app.state.store = store
    app.state.storage = settings.open_storage()
    app.state.celery = celery_app
    app.state.submit_limit = SubmitRateLimit.from_settings(settings, store.names.rate_limits)
    app.state.metrics = ApiMetrics()
    app.state.stream_pool = streams
    app.state.stream_slots = stream_slots(store, per_key=settings.max_streams_per_key,
                                          heartbeat_s=settings.sse_heartbeat_s, timeout_s=settings.redis_timeout_s)
    if settings.signing_secret:
        app.state.signing_secret = settings.signing_secret
    else:
        # Links then stop working when this process restarts, and differ between API replicas.
        log.warning("APP_SIGNING_SECRET is not set: using a random one for this process")
        app.state.signing_secret = secrets.token_urlsafe(32)

    install_error_handlers(app)
    app.include_router(jobs.router, prefix=API_PREFIX)
    app.include_router(artifacts.router, prefix=API_PREFIX)
    app.include_router(models.router, prefix=API_PREFIX)
    app.include_router(datasets.router, prefix=API_PREFIX)
    app.include_router(catalog.router, prefix=API_PREFIX)
    app.include_router(webhooks.router, prefix=API_PREFIX)
    app.include_router(health.router)
    # Added last = outermost: oversized bodies are refused before anything else runs.
    app.add_middleware(
        RequestMetricsMiddleware, requests=app.state.metrics.http_requests, latency=app.state.metrics.http_latency
    )
    # Dataset uploads stream past the JSON body limit; their route enforces the declared size.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       exempt=[("PUT", re.compile(API_PREFIX + datasets.CONTENT_PATH))])
    # Outermost: a 415 and a HEAD need no body read.
    app.add_middleware(JsonBodyMiddleware, routes=_json_body_routes())
    app.add_middleware(HeadBodyMiddleware)
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    return app


def _json_body_routes() -> list[tuple[str, re.Pattern[str]]]:
    """(method, path pattern) of the routes whose body is JSON: a body of another type is a 415.
    (tests/api_tests check that every route with a JSON body is listed.)"""
    return [("POST", re.compile(API_PREFIX + path)) for path in (jobs.router.prefix, datasets.router.prefix)]


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document with every error response as application/problem+json (what the
    handlers send) instead of FastAPI's default validation schema, the event stream's messages
    documented, and this server's limits in the spec's schema (so data valid by the document is
    data this server accepts)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
    )
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in operation.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", []):
                _absent_not_null(parameter)
    stream, stream_schemas = event_stream_openapi()
    doc["paths"][API_PREFIX + "/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"] = {
        "text/event-stream": stream
    }
    schemas.update(stream_schemas)
    _server_limits(schemas, settings)
    app.openapi_schema = doc
    return doc


def _absent_not_null(parameter: dict[str, Any]) -> None:
    """An optional parameter is left out, never sent as ``null``: a header or query value is a
    string, and the text "null" is not a valid stream id or status (FastAPI documents
    ``str | None`` as ``anyOf: [string, null]``)."""
    schema = parameter.get("schema", {})
    variants = schema.get("anyOf")
    if parameter.get("required") or not isinstance(variants, list):
        return
    others = [v for v in variants if v != {"type": "null"}]
    if len(others) == 1 and len(others) < len(variants):
        del schema["anyOf"]
        schema.update(others[0])


def _server_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The spec's bounds narrowed to this server's settings (the spec alone allows more)."""
    epochs = schemas["TrainingSpec"]["properties"]["epochs"]
    epochs["maximum"] = min(epochs["maximum"], settings.max_epochs)
    megabatches = schemas["StreamSpec"]["properties"]["megabatches"]
    megabatches["maximum"] = min(megabatches["maximum"], settings.max_megabatches)
    size = schemas["DatasetCreate"]["properties"]["bytes"]
    size["maximum"] = settings.max_dataset_bytes
    device = schemas["TrainingSpec"]["properties"]["device"]
    device["enum"] = [d for d in device["enum"] if settings.queue_for_device(d) is not None]
