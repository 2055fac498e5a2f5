"""The errors of the Python client (:mod:`anytime_prune.client` re-exports them): every non-2xx
answer of the API becomes an :class:`ApiError`, parsed from its ``application/problem+json``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class FieldProblem:
    """One bad field of a rejected request (``field`` is a dotted path like ``sparsity.target``)."""

    field: str
    reason: str


class ApiError(Exception):
    """A non-2xx answer of the API (or the service being unreachable: ``status`` 0)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[FieldProblem] | None = None,
        *,
        type: str = "about:blank",  # noqa: A002 - the RFC 9457 member name
        retry_after: float | None = None,
    ):
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.type = type
        self.retry_after = retry_after
        lines = [f"{status} {title}: {detail}" if status else f"{title}: {detail}"]
        lines += [f"  {e.field}: {e.reason}" for e in self.errors]
        super().__init__("\n".join(lines))

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Parse a problem document; fall back to the status line for anything else (a proxy's
        HTML error page, an empty body)."""
        status = response.status_code
        title = response.reason_phrase or "error"
        detail = ""
        errors: list[FieldProblem] = []
        kind = "about:blank"
        try:
            body = json.loads(response.content) if response.content else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            title = str(body.get("title") or title)
            detail = str(body.get("detail") or "")
            kind = str(body.get("type") or kind)
            for item in body.get("errors") or []:
                if isinstance(item, dict):
                    errors.append(FieldProblem(str(item.get("field", "")), str(item.get("reason", ""))))
        if not detail:
            detail = response.text[:200].strip() or title
        retry_after: float | None = None
        with contextlib.suppress(ValueError):
            header = response.headers.get("Retry-After")
            retry_after = float(header) if header is not None else None
        return cls(status, title, detail, errors, type=kind, retry_after=retry_after)


class DownloadError(ApiError):
    """A downloaded artifact whose size or sha256 differs from the artifact listing."""


class DatasetInvalid(ApiError):
    """An uploaded dataset that validation refused: ``reason`` says why, ``dataset`` is its record."""

    def __init__(self, dataset: Mapping[str, Any]):
        self.dataset = dict(dataset)
        self.reason = str(dataset.get("error") or "no reason given")
        super().__init__(0, "dataset invalid", f"dataset {dataset.get('id')}: {self.reason}")
