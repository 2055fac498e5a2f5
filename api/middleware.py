"""ASGI middleware: the request body limit and the HTTP request metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
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


def route_template(path: str, route_path: str | None) -> str:
    """The full template of a matched request, e.g. ``/api/v1/jobs/{job_id}/events``.

    A route included with a prefix may know only its own part of the template (``/jobs/{job_id}``,
    depending on the FastAPI version); prefixes have no parameters, so the missing leading
    segments are copied from the request path.
    """
    if not route_path:
        return "<unmatched>"
    actual = path.strip("/").split("/")
    own = route_path.strip("/").split("/") if route_path.strip("/") else []
    missing = actual[: max(0, len(actual) - len(own))]
    return "/" + "/".join([*missing, *own])


class RequestMetricsMiddleware:
    """Counts requests by route template (not raw path: fuzzed URLs must not explode the label
    set), method and status, and times them."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency

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
            route = scope.get("route")
            # Plain Starlette routes (/docs, /openapi.json) have no parameters: their path is the template.
            route_path = getattr(route, "path", None) if route else (scope["path"] if "endpoint" in scope else None)
            template = route_template(scope["path"], route_path)
            method = scope.get("method", "")
            method = method if route_path and method in _METHODS else "OTHER"
            self.requests.labels(template, method, str(status)).inc()
            self.latency.labels(template, method).observe(time.perf_counter() - start)
