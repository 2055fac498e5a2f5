"""/api/v1/webhooks: the API key's signing secret; /api/v1/jobs/{id}/deliveries: a job's webhook
attempts. Deliveries themselves are made by the control worker (:mod:`worker.courier`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import OwnerDep, StoreDep
from api.errors import ApiProblem, problem_responses, validation_problem
from api.schemas import FieldError
from app_common.jobs import Notify
from app_common.settings import Settings
from app_common.webhooks import UnsafeUrl, check_url

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str = Field(
        pattern=r"^whsec_[A-Za-z0-9+/=]+$",
        description="The key's signing secret (Standard Webhooks): verify deliveries with "
        "`standardwebhooks.Webhook(secret).verify(body, headers)`.",
    )


class DeliveryAttempt(BaseModel):
    """One attempt to deliver one webhook."""

    model_config = ConfigDict(extra="allow")

    time: str = Field(description="When the attempt started (UTC).")
    event: Literal["job.started", "job.megabatch", "job.completed"]
    webhook_id: str = Field(description="The delivery's `webhook-id` header: the same on every retry.")
    attempt: int = Field(
        ge=0, description="The attempt's number (1 for the first). On the entry that gives a delivery up at its "
        "deadline (error `expired: ...`): the attempts made before it, 0 when none was made.",
    )
    status_code: int | None = Field(description="The receiver's HTTP status; null when there was no answer.")
    error: str | None = Field(
        description="Why there was no answer (timeout, refused address, ...), or why the delivery was given up: "
        "`expired: ...` when its retry window (the whole retry schedule, about an hour by default) ended "
        "before it was delivered, for instance because no control worker with the `webhooks` extra runs."
    )
    outcome: Literal["delivered", "retrying", "failed"] = Field(
        description="delivered: a 2xx; retrying: another attempt follows at next_attempt_at; failed: given up "
        "(the last attempt failed, or the delivery's deadline passed)."
    )
    next_attempt_at: str | None
    megabatch: int | None = Field(default=None, description="The megabatch of a job.megabatch delivery.")


class DeliveryList(BaseModel):
    items: list[DeliveryAttempt] = Field(description="Oldest first; the newest 200 attempts.")


def check_notify_url(notify: Notify | None, settings: Settings) -> None:
    """422 naming ``notify.url`` when its host is an address webhooks may not reach (loopback,
    private, link-local, ...) or does not resolve (within ``APP_WEBHOOK_RESOLVE_TIMEOUT_S``)."""
    if notify is None:
        return
    try:
        check_url(notify.url, allow_private=settings.webhook_allow_private,
                  timeout_s=settings.webhook_resolve_timeout_s)
    except UnsafeUrl as exc:
        raise validation_problem([FieldError(field="notify.url", reason=str(exc))]) from None


@router.get(
    "/webhooks/secret", operation_id="webhook_secret", response_model=WebhookSecret,
    summary="The API key's webhook signing secret", responses=problem_responses(401),
    description="Created on first use. Every delivery of the key's jobs is signed with it (Standard Webhooks).",
)
def webhook_secret(owner: OwnerDep, store: StoreDep) -> WebhookSecret:
    return WebhookSecret(secret=store.webhook_secret(owner))


@router.post(
    "/webhooks/secret/rotate", operation_id="rotate_webhook_secret", response_model=WebhookSecret,
    summary="Replace the API key's webhook signing secret", responses=problem_responses(401),
    description="Every attempt from now on, retries of earlier deliveries included, is signed with the new secret.",
)
def rotate_webhook_secret(owner: OwnerDep, store: StoreDep) -> WebhookSecret:
    return WebhookSecret(secret=store.rotate_webhook_secret(owner))


@router.get(
    "/jobs/{job_id}/deliveries", operation_id="job_deliveries", response_model=DeliveryList,
    summary="A job's webhook delivery attempts", responses=problem_responses(401, 404),
)
def job_deliveries(job_id: str, owner: OwnerDep, store: StoreDep) -> DeliveryList:
    record = store.get_job(job_id)
    if record is None or record.owner != owner:  # as every job route: another key's job is a missing one
        raise ApiProblem(404, f"no job {job_id}", slug="job-not-found")
    return DeliveryList.model_validate({"items": store.delivery_attempts(job_id)})
