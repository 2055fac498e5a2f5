"""MLflow tracking of a job: an engine callback that mirrors the run into an MLflow run.

When the worker's settings name a tracking server (``MLFLOW_TRACKING_URI``), each job is one MLflow
run in the experiment its ``tracking.mlflow_experiment`` names (default ``anytime-prune``, created
when missing), named after the job and tagged ``job_id`` and ``api_key_id`` (the key's id, never its
secret):

- params: the validated spec flattened to dotted keys (``training.epochs``), values as JSON
  scalars, cut to MLflow's length limit;
- per megabatch (step = megabatch index): test, validation and train accuracy, density, target
  density, non-zero parameters, generalisation gap, test errors and the CER so far;
- per epoch (step = epochs done across megabatches, ``(megabatch - 1) * epochs + epoch``):
  ``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/val_accuracy``, ``epoch/lr``;
- at the end of a completed run: ``layer_density/<parameter>`` of the last megabatch, and the sparse
  model, manifest, report and result.json as artifacts (read from the run folder, where the engine
  has written them before it emits ``run_ended``).

The run id and its UI link go into the job record (``mlflow``) as soon as the run exists; a retry
of the job (after a lost worker) continues that run, skipping the steps already logged. The run
ends FINISHED, FAILED or KILLED with the job (:meth:`JobTracking.end`); a delivery that is retried
leaves it running.

Tracking never fails or stops a job. The first error (the server unreachable, the mlflow package
missing, a refused request) turns tracking off for the rest of the job and appends one ``warning``
event saying so. MLflow's client would retry a request for minutes; :data:`CLIENT_ENV` (applied
unless the environment sets them) makes an unreachable server cost seconds.

Torch-free; ``mlflow`` is imported only when a job is tracked, in the process that runs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError

from app_common.events import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    EpochEnded,
    Event,
    MegabatchEnded,
    MegabatchMetrics,
    RunEnded,
    RunStarted,
    WarningIssued,
)
from app_common.jobs import DEFAULT_MLFLOW_EXPERIMENT, JobRecord, MlflowRun
from app_common.settings import Settings
from app_common.spec import JobSpec, SpecError
from app_common.store import JobStore

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

SOURCE = "mlflow"

# MLflow's defaults retry a failed request 7 times with a backoff from 2 s and wait 120 s for an
# answer: minutes per call against a dead server. These cost seconds (urllib3 retries at once,
# then after 2 s) and still ride out a blip. The operator's environment wins.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated would otherwise fetch the run again to print its link on stdout
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

# Files of a completed run's folder logged as artifacts (those that exist).
ARTIFACTS = ("model.sparse.safetensors", "manifest.json", "report.png", "result.json")

# MegabatchMetrics fields logged per megabatch (plus "cer", the cumulative test errors).
MEGABATCH_METRICS = (
    "test_accuracy", "val_accuracy", "train_accuracy", "density", "target_density", "nonzero_params",
    "generalization_gap", "test_errors", "train_accuracy_clean", "generalization_gap_clean",
)
EPOCH_METRICS = {"epoch/train_loss": "train_loss", "epoch/train_accuracy": "train_accuracy",
                 "epoch/val_accuracy": "val_accuracy", "epoch/lr": "lr"}
# One key of each kind marks the steps already logged (a retry reads their history once).
MEGABATCH_MARK, EPOCH_MARK, CER = "test_accuracy", "epoch/train_loss", "cer"

RUN_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}

_MAX_PARAM_VALUE = 6000  # MLflow's limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH) when not importable
_MAX_KEY = 250
_BATCH = 100  # params per log_batch request (MLflow's MAX_PARAMS_TAGS_PER_BATCH)
_KEY_CHARS = re.compile(r"[^\w\-. /:]")


class TrackingError(Exception):
    """A tracking problem with a message for the job's owner."""


def flatten_params(value: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, value)`` of every leaf of a nested mapping: strings as they are, anything
    else as JSON (``true``, ``null``, ``["onnx"]``); an empty mapping is the leaf ``{}``."""
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            yield from flatten_params(item, f"{name}.")
        else:
            yield name, item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)


def run_url(base: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI at ``base`` (http or https; None otherwise)."""
    if not base or urlsplit(base).scheme not in ("http", "https"):
        return None
    return f"{redact(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def redact(uri: str) -> str:
    """``uri`` without user name and password."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _key(name: str) -> str:
    return _KEY_CHARS.sub("_", name)[:_MAX_KEY]


class JobTracking:
    """One job's MLflow run: an engine callback (``run(..., callbacks=[..., tracking])``) that never
    raises, except the progress sink's :class:`~app_engine.runner.StopRun` out of its one warning.

    Off (every call returns at once, mlflow is not imported) when the settings have no tracking
    URI. ``warn`` is where the warning event goes while the engine runs (the worker sets it to the
    job's progress sink, so the warning is in order with the run's events); without it, and after
    the run, the event is appended to the store directly.
    """

    def __init__(self, record: JobRecord, *, settings: Settings, store: JobStore, out_dir: Path) -> None:
        self.job_id = record.id
        self.owner = record.owner
        self.spec = record.spec
        self.experiment = record.tracking.mlflow_experiment if record.tracking else DEFAULT_MLFLOW_EXPERIMENT
        self.previous = record.mlflow
        self.retried = record.attempt > 0  # an earlier delivery may have opened the run
        self.uri = settings.mlflow_tracking_uri or None
        self.public_url = settings.mlflow_public_url or self.uri
        self.store = store
        self.out_dir = Path(out_dir)
        self.warn: Callable[[Event], None] | None = None
        self.run: MlflowRun | None = None
        self.failed = False
        self.ended = False
        self._client: MlflowClient | None = None
        self._steps: dict[str, set[int]] = {MEGABATCH_MARK: set(), EPOCH_MARK: set(), CER: set()}
        self._cer: int | None = 0  # CER so far; None when a retry could not learn the earlier megabatches'
        self._last: MegabatchMetrics | None = None

    @property
    def enabled(self) -> bool:
        return self.uri is not None and not self.failed

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        try:
            if self._client is None:
                self._open(event.resumed_after if isinstance(event, RunStarted) else 0)
            if isinstance(event, EpochEnded):
                self._log_epoch(event)
            elif isinstance(event, MegabatchEnded):
                self._log_megabatch(event.metrics)
            elif isinstance(event, RunEnded) and not event.stopped:
                self._log_final()
        except Exception as exc:  # noqa: BLE001 -- tracking never fails the job
            self._give_up(exc)

    def end(self, outcome: str) -> None:
        """End the MLflow run as the job ended (``succeeded`` -> FINISHED, ``failed`` -> FAILED,
        ``cancelled`` -> KILLED), once; any other outcome (the delivery stood down or lost the
        job) leaves it running for the delivery that continues the job."""
        status = RUN_STATUS.get(outcome)
        if status is None or self._client is None or self.run is None or not self.enabled or self.ended:
            return
        self.ended = True
        try:
            self._client.set_terminated(self.run.run_id, status)
        except Exception as exc:  # noqa: BLE001
            self.warn = None  # the run is over: the store takes the event
            self._give_up(exc)

    def end_abandoned(self) -> None:
        """The job fails without a run in this delivery (its workers died too often): end the
        MLflow run an earlier delivery opened, FAILED."""
        if not self.enabled or self.previous is None:
            return
        try:
            self._client = self._new_client()
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)
            return
        self.run = self.previous
        self.end(FAILED)

    # --- the run ------------------------------------------------------------------------------

    def _new_client(self) -> MlflowClient:
        for name, value in CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("the mlflow package is not installed on this worker "
                                "(install the 'mlflow' extra)") from None
        return MlflowClient(tracking_uri=self.uri)

    def _open(self, resumed_after: int) -> None:
        client = self._new_client()
        run = self._existing_run(client)
        if run is None:
            run = client.create_run(self._experiment_id(client), run_name=self.job_id,
                                    tags={"job_id": self.job_id, "api_key_id": self.owner})
        else:
            log.info("job %s: continuing MLflow run %s", self.job_id, run.info.run_id)
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            self._learn_steps(client, run.info.run_id, resumed_after)
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        self._client = client
        self.run = MlflowRun(run_id=run_id, experiment_id=experiment_id,
                             url=run_url(self.public_url, experiment_id, run_id))
        self._log_params(run_id)
        if self.previous != self.run:
            try:
                self.store.set_mlflow_run(self.job_id, self.run)
            except RedisError as exc:  # the run is still tracked; a retry finds it by its job_id tag
                log.warning("job %s: could not record MLflow run %s (%s)", self.job_id, run_id, exc)

    def _existing_run(self, client: MlflowClient) -> Any:
        from mlflow.exceptions import MlflowException

        if self.previous is not None:
            try:
                run = client.get_run(self.previous.run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                return run
        if self.retried:  # opened by a delivery that could not record it
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is not None and experiment.lifecycle_stage == "active":
                runs = client.search_runs([experiment.experiment_id], f"tags.job_id = '{self.job_id}'",
                                          max_results=1)
                if runs:
                    return runs[0]
        return None

    def _experiment_id(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return str(client.create_experiment(self.experiment))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = client.get_experiment_by_name(self.experiment)  # another worker made it meanwhile
            if experiment is None:
                raise TrackingError(f"could not create the MLflow experiment {self.experiment!r}")
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"the MLflow experiment {self.experiment!r} is deleted: restore it or name "
                                "another in tracking.mlflow_experiment")
        return str(experiment.experiment_id)

    def _learn_steps(self, client: MlflowClient, run_id: str, resumed_after: int) -> None:
        """What an earlier delivery logged: steps to skip, and the CER so far."""
        for key in self._steps:
            self._steps[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if resumed_after:
            cer = [m for m in client.get_metric_history(run_id, CER) if m.step == resumed_after]
            self._cer = int(cer[-1].value) if cer else None

    def _log_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:
            limit = _MAX_PARAM_VALUE
        try:
            spec = JobSpec.from_dict(self.spec).to_dict()
        except SpecError:
            spec = self.spec
        params = [Param(_key(k), v[:limit]) for k, v in flatten_params(spec)]
        for start in range(0, len(params), _BATCH):
            self._require_client().log_batch(run_id, params=params[start:start + _BATCH])

    # --- metrics and files --------------------------------------------------------------------

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's MAX_METRICS_PER_BATCH
            self._require_client().log_batch(self._run_id(), metrics=metrics[start:start + 1000])

    def _log_epoch(self, event: EpochEnded) -> None:
        step = (event.megabatch - 1) * event.epochs + event.epoch
        if step in self._steps[EPOCH_MARK]:
            return
        self._log_metrics({key: getattr(event, name) for key, name in EPOCH_METRICS.items()}, step)
        self._steps[EPOCH_MARK].add(step)

    def _log_megabatch(self, metrics: MegabatchMetrics, cer: int | None = None) -> None:
        step = metrics.index
        if self._last is None or step >= self._last.index:
            self._last = metrics
        if cer is None and self._cer is not None:
            self._cer += metrics.test_errors
            cer = self._cer
        values = {name: getattr(metrics, name) for name in MEGABATCH_METRICS}
        values = {k: v for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}
        if step not in self._steps[MEGABATCH_MARK]:
            self._log_metrics(values, step)
            self._steps[MEGABATCH_MARK].add(step)
        if cer is not None and step not in self._steps[CER]:
            self._log_metrics({CER: cer}, step)
            self._steps[CER].add(step)

    def _log_final(self) -> None:
        """A completed run: fill any megabatch an earlier delivery ended without logging (from
        result.json), the final per-layer density, and the files."""
        result = json.loads((self.out_dir / "result.json").read_text())
        cer = 0
        for entry in result.get("megabatches", []):
            metrics = MegabatchMetrics.from_dict(entry)
            cer += metrics.test_errors
            if metrics.index not in self._steps[MEGABATCH_MARK] or metrics.index not in self._steps[CER]:
                self._log_megabatch(metrics, cer)
        if self._last is not None:
            layers = {f"layer_density/{name}": d for name, d in self._last.layer_density.items()}
            self._log_metrics(layers, self._last.index)
        for name in ARTIFACTS:
            path = self.out_dir / name
            if path.is_file():
                self._require_client().log_artifact(self._run_id(), str(path))

    def _require_client(self) -> MlflowClient:
        if self._client is None:
            raise TrackingError("no MLflow run")
        return self._client

    def _run_id(self) -> str:
        if self.run is None:
            raise TrackingError("no MLflow run")
        return self.run.run_id

    # --- failure ------------------------------------------------------------------------------

    def _give_up(self, exc: BaseException) -> None:
        """Turn tracking off for the rest of the job and say so once, in the job's events."""
        self.failed = True
        assert self.uri is not None
        log.warning("job %s: MLflow tracking at %s failed; the job goes on without it: %s", self.job_id,
                    redact(self.uri), exc)
        log.debug("job %s: the tracking error", self.job_id, exc_info=exc)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = detail.replace(str(self.out_dir.resolve()), "<work>").replace(str(self.out_dir), "<work>")
        detail = detail.replace(self.uri, redact(self.uri))
        if len(detail) > 300:
            detail = detail[:297] + "..."
        event = WarningIssued(
            source=SOURCE,
            message=f"MLflow tracking at {redact(self.uri)} stopped; the job goes on without it ({detail})",
        )
        if self.warn is not None:
            self.warn(event)  # the progress sink: may raise StopRun, which the engine expects
            return
        try:
            self.store.append_event(self.job_id, event)
        except RedisError as err:
            log.warning("job %s: could not record the tracking warning (%s)", self.job_id, err)
