"""Cursor pagination shared by the list routes (jobs, datasets): the same query parameters and the
same error for a cursor this API did not issue."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from api.errors import ApiProblem, validation_problem
from app_common.spec import FieldError

PageLimit = Annotated[int, Query(ge=1, le=100)]
PageCursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page.")]


def invalid_cursor() -> ApiProblem:
    return validation_problem([FieldError(field="cursor", reason="not a cursor from this API")])
