"""The Celery application of the worker (``celery -A worker.celery_app worker -Q gpu``).

Settings for hour-long, resumable jobs (DESIGN.md, "Job lifecycle"):

- JSON only, results ignored: the job record in Redis holds the state, not Celery's backend.
- ``acks_late`` + ``reject_on_worker_lost``: a message is acknowledged only after the job ran;
  when the pool child dies mid-job the message goes back to the queue and the job resumes from
  its last megabatch checkpoint (the lease and attempt counter in :mod:`worker.job` make the
  redelivery safe and bounded).
- prefetch 1, one task per child process: a worker holds only the job it runs, and every job
  gets a fresh process (no CUDA or allocator state leaks from one job to the next).
- the Redis visibility timeout (``APP_VISIBILITY_TIMEOUT_S``, a day by default) is above the
  longest job allowed, so Redis does not hand a running job to a second worker; if it ever did,
  the lease makes the copy stand down. A long timeout only delays the return of a message held
  by a worker that died unnoticed, and the reaper covers that case.
- a reaper thread in the worker's main process re-enqueues jobs whose whole worker died
  (:mod:`worker.reaper`).
- a control worker's main process also runs the webhook courier (:mod:`worker.courier`), which
  delivers the jobs' webhooks off the training path.
- fair dispatch: a training worker's main process pops the next job from the store's per-key
  queues whenever it has a free slot and sends it to its own direct queue (``worker_direct``);
  a message whose job is already finished is dropped there, before a child is forked
  (:mod:`worker.dispatcher`).

Importing this module must not import torch: the parent process never touches the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_init, worker_ready, worker_shutdown
from kombu.entity import Exchange, Queue

from app_common.settings import Settings
from app_common.tasks import CONTROL_QUEUE, QUEUE_NAMES, VALIDATE_DATASET_TASK
from worker.tasks import register_tasks

log = logging.getLogger(__name__)

# The training queues and the control queue (dataset validation, off the training queues).
QUEUES = (*QUEUE_NAMES, CONTROL_QUEUE)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The worker's Celery configuration.

    A producer (the API, which never imports this package) needs only the broker URL and the
    same transport options, ``settings.celery_transport_options()``, to reach these queues.
    """
    # The same options as the API's producer (queue key prefix, visibility timeout), and the same
    # visibility timeout on every setting Celery names (broker and result backend).
    transport = settings.celery_transport_options()
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_concurrency": 1,
        # One direct exchange per queue, routing key = queue name: what Celery creates for a
        # queue it does not know, so an API that sends with ``queue=`` and no queue config routes
        # the same way. (A bare Queue(name) would be bound to the default queue's exchange and key.)
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
            for name in QUEUES
        ],
        "task_default_queue": settings.default_queue,
        # Each worker also consumes "{hostname}.dq2": the dispatcher sends its picks there.
        "worker_direct": True,
        "task_routes": {VALIDATE_DATASET_TASK: {"queue": CONTROL_QUEUE}},
        # Job state lives in our records; Celery's task events would only add traffic.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with its tasks (:func:`worker.tasks.register_tasks`) registered.

    The app's worker, once ready, starts the orphan reaper in its main process; a worker without
    a Redis URL refuses to start (the ``serve`` command passes the embedded Redis's URL).
    """
    app = Celery("anytime_prune", set_as_current=False)
    app.conf.update(celery_config(settings))
    register_tasks(app, settings)
    _connect_worker_signals(app, settings)
    return app


def _connect_worker_signals(app: Celery, settings: Settings) -> None:
    state: dict[str, Any] = {}

    def on_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and settings.redis_url is None:
            # SystemExit, not an exception: Celery swallows exceptions raised by signal handlers,
            # and a worker without a broker URL would otherwise retry amqp://localhost forever.
            raise SystemExit("a worker needs REDIS_URL (the broker and the job store)")

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        # Imported here: the reaper is only needed in a running worker's main process.
        from worker.reaper import start_reaper

        state["reaper"] = start_reaper(app, settings)
        from worker.dispatcher import start_dispatcher

        state["dispatcher"] = start_dispatcher(app, settings, sender)
        # The webhook courier: in control workers only, off the training path.
        from worker.courier import start_courier

        state["courier"] = start_courier(settings, app)

    def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
        # In the main process, before the pool sees the request (and forks a child for it).
        if getattr(sender, "app", None) is not app or request is None:
            return
        dispatcher = state.get("dispatcher")
        if dispatcher is not None:
            dispatcher.received(request.id)
        store = state.get("store")
        if store is None:
            from worker.tasks import connect_store

            store = state["store"] = connect_store(settings)
        from worker.dispatcher import drop_if_finished

        drop_if_finished(store, request)

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        for name in ("courier", "dispatcher", "reaper"):
            thread = state.pop(name, None)
            if thread is not None:
                thread.stop()

    # weak=False: the handlers are closures that nothing else references.
    worker_init.connect(on_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    task_received.connect(on_received, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)


app = make_celery(Settings())
