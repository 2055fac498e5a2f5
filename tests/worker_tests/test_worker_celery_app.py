"""worker/celery_app.py and worker/cli.py: configuration, refusal to start without Redis, no torch in the parent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_support import REPO

from app_common.settings import Settings
from app_common.tasks import RUN_JOB_TASK, VALIDATE_DATASET_TASK
from worker.celery_app import make_celery
from worker.cli import run_worker, worker_argv


def test_celery_config(settings: Settings) -> None:
    app = make_celery(settings)
    try:
        conf = app.conf
        assert conf.task_serializer == "json" and conf.result_serializer == "json"
        assert list(conf.accept_content) == ["json"]
        assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
        assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
        assert conf.broker_transport_options == settings.celery_transport_options()
        assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout_s
        assert conf.broker_transport_options["global_keyprefix"] == settings.celery_key_prefix
        assert conf.result_backend_transport_options["visibility_timeout"] == settings.visibility_timeout_s
        assert {q.name for q in conf.task_queues} == {"cpu", "gpu", "control"} and conf.task_default_queue == "cpu"
        # Dataset validation goes to the control queue, never behind a training job.
        assert conf.task_routes == {VALIDATE_DATASET_TASK: {"queue": "control"}}
        # Each queue on its own exchange and key: a job sent to one queue never lands in the other.
        assert all(q.exchange.name == q.routing_key == q.name for q in conf.task_queues)
        assert RUN_JOB_TASK in app.tasks and VALIDATE_DATASET_TASK in app.tasks
    finally:
        app.close()


def test_worker_needs_redis_and_a_known_queue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown queue 'tpu'"):
        worker_argv("tpu")
    assert worker_argv("control")[:3] == ["worker", "--queues", "control"]  # dataset validation
    with pytest.raises(RuntimeError, match="REDIS_URL"):
        run_worker("cpu", Settings(redis_url=None, artifacts_dir=tmp_path))
    # The plain Celery command line refuses to start too, instead of retrying amqp://localhost.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "APP_REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "a worker needs REDIS_URL" in done.stderr


def test_importing_the_celery_app_does_not_import_torch() -> None:
    code = "import sys, worker.celery_app, worker.reaper, worker.cli; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
