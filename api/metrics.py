"""Prometheus metrics of the API process, in a registry of its own (one per app, so several apps
in one process, as in tests, do not collide).

HTTP traffic is counted as it happens; job gauges, queue depths and job durations come from Redis
and are refreshed when ``/metrics`` is scraped.
"""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app_common.events import TERMINAL_STATUSES
from app_common.settings import Settings
from app_common.store import JobStore

log = logging.getLogger(__name__)

# Jobs run from seconds (tests, digits) to many hours (ImageNet-size streams).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, float("inf"))


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=self.registry
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds", "Time to answer (whole stream for SSE).", ["route", "method"],
            registry=self.registry,
        )
        self.jobs = Gauge("jobs", "Jobs in the store by status.", ["status"], registry=self.registry)
        self.queue_depth = Gauge(
            "queue_depth", "Jobs waiting for a worker: the per-key queues plus re-sent messages in the Celery queue.",
            ["queue"], registry=self.registry
        )
        self.job_duration = Histogram(
            "job_duration_seconds", "finished_at - started_at of finished jobs.", ["status"],
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.store_up = Gauge("store_up", "1 when Redis answered the last scrape.", registry=self.registry)
        # Finished jobs already observed in job_duration (each is observed once per process).
        self._observed: set[str] = set()

    def refresh(self, store: JobStore, settings: Settings) -> None:
        """Read job counts, queue lengths and newly finished jobs from Redis; a Redis outage only
        sets ``store_up`` to 0, the HTTP metrics are still served."""
        try:
            for status, count in store.count_by_status().items():
                self.jobs.labels(status).set(count)
            for queue in settings.queues:
                waiting = store.queued_count(queue) + store.celery_queue_length(queue, settings.celery_key_prefix)
                self.queue_depth.labels(queue).set(waiting)
            for status in sorted(TERMINAL_STATUSES):
                fresh = sorted(store.job_ids_with_status(status) - self._observed)
                for job in store.get_jobs(fresh):
                    self._observed.add(job.id)
                    started, finished = job.started_at, job.finished_at
                    if started is not None and finished is not None:
                        self.job_duration.labels(status).observe(max(0.0, (finished - started).total_seconds()))
            self.store_up.set(1)
        except redis.exceptions.RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            self.store_up.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

