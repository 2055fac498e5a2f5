"""The worker: adapts the APP engine to Celery and Redis.

``worker.celery_app`` builds the Celery application (torch-free, imported by the worker's parent
process); ``worker.tasks`` is the thin task adapter; ``worker.job`` holds the work itself
(lease, attempts, status transitions, the engine run) and is testable without Celery;
``worker.sink`` turns engine events into Redis stream entries and cancel requests into
:class:`app_engine.runner.StopRun`; ``worker.lease`` keeps a job's lease alive while it runs;
``worker.reaper`` re-enqueues jobs whose worker died; ``worker.cli`` starts a worker.

The engine (and so torch) is imported only inside the task body, which runs in the forked pool
child: the parent process never touches torch or CUDA.
"""
