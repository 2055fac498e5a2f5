"""/healthz (the process is alive), /readyz (Redis answers) and /metrics (Prometheus)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.deps import SettingsDep, StoreDep
from api.errors import RETRY_AFTER_S, ApiProblem, problem_responses
from api.metrics import ApiMetrics
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", operation_id="readyz", response_model=Health, summary="Readiness: Redis answers",
            responses=problem_responses(503))
def readyz(store: StoreDep) -> Health:
    try:
        store.ping()
    except redis.exceptions.RedisError as exc:
        raise ApiProblem(503, f"redis unreachable: {exc}", slug="not-ready",
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
async def prometheus_metrics(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    metrics: ApiMetrics = request.app.state.metrics
    await run_in_threadpool(metrics.refresh, store, settings)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
