"""/healthz (the process is alive), /readyz (Redis answers) and /metrics (Prometheus)."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.deps import SettingsDep, StoreDep
from api.errors import RETRY_AFTER_S, ApiProblem, problem_responses
from api.metrics import ApiMetrics
from api.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


# HEAD answers as GET without the body (api.middleware.HeadBodyMiddleware drops it); it stays out
# of the published document, where each operation id must be unique.
@router.get("/healthz", operation_id="healthz", response_model=Health, summary="Liveness")
@router.head("/healthz", include_in_schema=False)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", operation_id="readyz", response_model=Health, summary="Readiness: Redis answers",
            responses=problem_responses(503))
@router.head("/readyz", include_in_schema=False)
def readyz(store: StoreDep) -> Health:
    try:
        store.ping()
    except redis.exceptions.RedisError as exc:
        # Unauthenticated: the reason (host, port) goes to the log, not to the caller.
        log.warning("not ready: redis unreachable: %s", exc)
        raise ApiProblem(503, "the job store is unreachable", slug="not-ready",
                         headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    return Health(status="ready")


@router.get(
    "/metrics",
    operation_id="prometheus_metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
@router.head("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    metrics: ApiMetrics = request.app.state.metrics
    await run_in_threadpool(metrics.refresh, store, settings)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
