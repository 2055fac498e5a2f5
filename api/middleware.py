"""ASGI middleware: the request body limit and the HTTP request metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import fastapi.routing
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem_response

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def matches_route(scope: Scope, routes: Iterable[tuple[str, re.Pattern[str]]]) -> bool:
    """Whether the request is one of ``routes`` (method, and a pattern the whole path matches)."""
    path = scope.get("path", "")
    return any(scope.get("method") == method and pattern.fullmatch(path) for method, pattern in routes)


class BodySizeLimitMiddleware:
    """413 for a request body over ``max_bytes``: at once when Content-Length says so, otherwise
    as soon as the streamed (chunked) body passes the limit.

    Requests whose (method, path) match one of ``exempt`` pass unlimited: routes that stream a
    large body (a dataset upload) enforce a limit of their own.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Iterable[tuple[str, re.Pattern[str]]] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = tuple(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        detail = f"request body larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await problem_response(413, detail, slug="body-too-large")(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Starlette's HTTPException passes through FastAPI's body parsing to the
                    # exception handlers, which answer with a problem document.
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited_receive, send)

    def _exempt(self, scope: Scope) -> bool:
        return matches_route(scope, self.exempt)


class JsonBodyMiddleware:
    """415 for a body that is not JSON sent to a route that reads JSON (FastAPI would try to
    validate it as an object and answer 422, which blames the content instead of its type).

    A request without Content-Type, or without a body, passes: FastAPI reads JSON by default.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[tuple[str, re.Pattern[str]]]):
        self.app = app
        self.routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._reads_json(scope):
            headers = dict(scope.get("headers", []))
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            if content_type and has_body and not is_json_media_type(content_type):
                detail = f"the body must be application/json, not {content_type.split(';')[0].strip()[:100]}"
                response = problem_response(415, detail, slug="unsupported-media-type",
                                            headers={"Accept-Post": "application/json"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _reads_json(self, scope: Scope) -> bool:
        return matches_route(scope, self.routes)


class HeadBodyMiddleware:
    """HEAD answers carry the headers of GET and no body (RFC 9110 section 9.3.2); routes
    registered for HEAD run the GET handler, and this drops what it writes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, headers_only)


def is_json_media_type(content_type: str) -> bool:
    """application/json or a +json type (what FastAPI parses as JSON), parameters ignored."""
    main = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = main.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


# The route label of a request no route matched (a 404 of the router, a redirect to the slashed
# path): one value, whatever the path, so clients cannot grow the label set.
UNMATCHED = "unmatched"


def route_templates(routes: Iterable[BaseRoute]) -> dict[int, str]:
    """The full template of every route of an app, e.g. ``/api/v1/jobs/{job_id}/events``, by the
    ``id()`` of the route object the router puts in the scope (``scope["route"]``) and of its
    endpoint (Starlette's own routes, such as ``/openapi.json``, and mounts leave only that). A
    mounted app (the docs' static files) is ``<mount path>/{path}``.

    FastAPI keeps an included router's routes with their own path (``/jobs/{job_id}``) and the
    prefix apart; ``fastapi.routing.iter_route_contexts`` joins them (older versions copy each
    route with its full path into ``app.routes``, which is what is read without it).
    """
    contexts: Iterable[Any] = routes
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    if iterate is not None:
        contexts = iterate(list(routes))
    templates: dict[int, str] = {}
    for context in contexts:
        original = getattr(context, "original_route", context)
        path = getattr(context, "path_format", None) or getattr(context, "path", None)
        if not isinstance(path, str):
            continue
        if isinstance(original, Mount):  # its path_format is already "<mount path>/{path}"
            template = str(getattr(context, "path", "")).rstrip("/") + "/{path}"
            templates.setdefault(id(original), template)
            templates.setdefault(id(original.app), template)
            continue
        templates.setdefault(id(original), path)
        endpoint = getattr(context, "endpoint", None)
        if endpoint is not None:
            templates.setdefault(id(endpoint), path)
    return templates


class RequestMetricsMiddleware:
    """Counts requests by route template (never the raw path: fuzzed URLs must not explode the
    label set; see :func:`route_templates`), method and status, and times them."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency
        # Built at the first request, when every route is in place; rebuilt when a route added
        # later answers (its id is not in it yet).
        self._templates: dict[int, str] | None = None

    def route_label(self, scope: Scope) -> str:
        """The template of the route that answered (see :func:`route_templates`), else
        :data:`UNMATCHED`; never a part of the request's own path."""
        matched = scope.get("route") or scope.get("endpoint")
        if matched is None:
            return UNMATCHED
        for attempt in range(2):
            if self._templates is None or attempt:
                self._templates = route_templates(getattr(scope.get("app"), "routes", ()))
            for candidate in (scope.get("route"), scope.get("endpoint")):
                if candidate is not None and id(candidate) in self._templates:
                    return self._templates[id(candidate)]
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            template = self.route_label(scope)
            method = scope.get("method", "")
            method = method if template != UNMATCHED and method in _METHODS else "OTHER"
            self.requests.labels(template, method, str(status)).inc()
            self.latency.labels(template, method).observe(time.perf_counter() - start)
