"""Queueing dataset validations: a Celery app used only as a producer. The API sends the task by *name*, so it
never imports the worker (or torch). Training jobs are not sent from here: the API puts them on
their key's queue in the store, and an idle training worker takes the next one
(:mod:`app_common.store.queues`, :mod:`worker.dispatcher`)."""

from __future__ import annotations

import logging

from celery import Celery

from app_common.settings import Settings
from app_common.tasks import CONTROL_QUEUE, VALIDATE_DATASET_TASK

log = logging.getLogger(__name__)


def create_celery(settings: Settings) -> Celery:
    """A producer-side Celery app on the Redis broker: JSON only, no results, fail fast.

    Publishing is not retried: when the broker is unreachable the API must answer 503 within
    about ``redis_timeout_s`` rather than block the request for Celery's retry schedule.
    """
    if not settings.redis_url:
        raise ValueError("settings.redis_url is required to queue jobs")
    app = Celery("anytime_prune_api", broker=settings.redis_url, set_as_current=False)
    timeout = settings.redis_timeout_s
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_publish_retry=False,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=0,
        broker_connection_timeout=timeout,
        broker_transport_options={
            **settings.celery_transport_options(),
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "max_retries": 0,
        },
    )
    return app


def enqueue_validation(celery_app: Celery, dataset_id: str) -> None:
    """Put ``validate_dataset(dataset_id)`` on the control queue (never behind training jobs);
    raises (kombu OperationalError, redis errors) when the broker cannot take it."""
    celery_app.send_task(VALIDATE_DATASET_TASK, args=[dataset_id], queue=CONTROL_QUEUE)
    log.info("dataset %s queued for validation on %s", dataset_id, CONTROL_QUEUE)
