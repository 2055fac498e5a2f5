"""Errors as ``application/problem+json`` (RFC 9457): ``{type, title, status, detail, errors}``.

Every failure the API answers goes through here, so clients parse one shape: validation errors
list each bad field as a dotted path (``sparsity.target``) with the reason; an unreachable Redis
is a 503 with ``Retry-After``; nothing a client sends can produce a 5xx other than that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas import Problem
from app_common.spec import FieldError, field_errors

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Seconds a client should wait before retrying when Redis is unreachable.
RETRY_AFTER_S = 2
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


class ApiProblem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.errors = list(errors)
        self.headers = headers or {}


def problem_type(slug: str | None) -> str:
    # ``about:blank`` means "nothing beyond the HTTP status" (RFC 9457 section 4.2.1).
    return f"urn:anytime-prune:problem:{slug}" if slug else "about:blank"


def problem_response(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    errors: Iterable[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> ProblemResponse:
    body = Problem(
        type=problem_type(slug),
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        errors=list(errors),
    )
    return ProblemResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def validation_problem(errors: Sequence[FieldError], detail: str | None = None) -> ApiProblem:
    fields = ", ".join(e.field for e in errors)
    return ApiProblem(422, detail or f"invalid request: {fields}", slug="validation-error", errors=errors)


async def _on_api_problem(request: Request, exc: Exception) -> ProblemResponse:
    if not isinstance(exc, ApiProblem):  # registered for this class only
        raise exc
    return problem_response(exc.status, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers)


async def _on_validation(request: Request, exc: Exception) -> ProblemResponse:
    if not isinstance(exc, RequestValidationError):  # registered for this class only
        raise exc
    errors = [_server_limit(e, request) for e in field_errors(exc.errors(), request=True)]
    problem = validation_problem(errors)
    return problem_response(422, problem.detail, slug=problem.slug, errors=problem.errors)


# Spec fields whose bound this server narrows (setting names): over the spec's own bound (epochs
# 10,000, megabatches 1,000) the reason states the server's, the one that matters here.
_SERVER_LIMITS = {"training.epochs": "max_epochs", "stream.megabatches": "max_megabatches"}


def _server_limit(error: FieldError, request: Request) -> FieldError:
    setting = _SERVER_LIMITS.get(error.field)
    if setting is None or not error.reason.startswith("Input should be less than"):
        return error
    limit = getattr(request.app.state.settings, setting)
    return FieldError(field=error.field, reason=f"at most {limit} on this server")


async def _on_http(request: Request, exc: Exception) -> ProblemResponse:
    if not isinstance(exc, StarletteHTTPException):  # registered for this class only
        raise exc
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer for bodies json cannot decode (invalid UTF-8, nesting too deep).
        errors = [FieldError(field="body", reason="malformed JSON")]
        return problem_response(422, "malformed JSON body", slug="validation-error", errors=errors)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
        # Starlette's Allow names only the first route on the path (GET of /jobs/{id}, not DELETE).
        headers["Allow"] = ", ".join(allowed_methods(request))
    # A chunked body over the limit is refused here (BodySizeLimitMiddleware raises while FastAPI
    # reads it): same problem type as the Content-Length refusal, so clients see one kind of 413.
    slug = "body-too-large" if exc.status_code == 413 else None
    return problem_response(exc.status_code, detail, slug=slug, headers=headers)


async def _on_redis_down(request: Request, exc: Exception) -> ProblemResponse:
    # The reason (host, port, errno) goes to the log only: clients learn what, not where.
    log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        503,
        "the job store is unavailable; retry later",
        slug="store-unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _on_unexpected(request: Request, exc: Exception) -> ProblemResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal error", slug="internal-error")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this request's path."""
    out = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            out.append(method)
    return out


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiProblem, _on_api_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    # Connection refused, timeouts, and a Redis that answers with errors (loading, read-only,
    # out of memory) all mean the store cannot serve this request now: 503, retry later.
    app.add_exception_handler(redis.exceptions.RedisError, _on_redis_down)
    app.add_exception_handler(Exception, _on_unexpected)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses (rendered as application/problem+json by
    :func:`api.main.create_app`'s OpenAPI hook)."""
    return {code: {"model": Problem, "description": HTTPStatus(code).phrase} for code in codes}
