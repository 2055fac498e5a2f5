"""MLflow tracking of a job: an engine callback that mirrors the run into an MLflow run, sent from
a background thread so that training never waits on the tracking server.

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
- at the end of a completed run (or of a stopped one whose updates the queue dropped, see below):
  any megabatch or epoch not logged yet (an earlier delivery ended without it, or the queue
  dropped it) from ``result.json``; for a completed run also ``layer_density/<parameter>`` of the
  last megabatch, and the sparse model, manifest, report and result.json as artifacts (read from
  the run folder, where the engine has written them before it emits ``run_ended``).

The run id and its UI link go into the job record (``mlflow``) as soon as the run exists; a retry
of the job (after a lost worker) continues that run, skipping the steps already logged. The run
ends FINISHED, FAILED or KILLED with the job (:meth:`JobTracking.end`); a delivery that is retried
leaves it running.

Off the training thread: the callback only queues what happened (:class:`~worker.outbox.Outbox`,
never blocking) and one thread per job makes the MLflow calls, in order, sending the metrics that
piled up while the server was busy as one ``log_batch``. At most ``settings.mlflow_queue_limit`` metric updates
(one epoch's or one megabatch's metrics) wait; past that the oldest waiting epoch update is dropped
(then the oldest megabatch update), the job's events say so once, and the end of the run logs
what was dropped from ``result.json``. :meth:`JobTracking.end` waits up to ``settings.mlflow_drain_timeout_s``
for the queue to be sent and the run ended, so a job is not ``succeeded`` before its run is
FINISHED; past the bound tracking stops with a warning and the job goes on.

Tracking never fails or stops a job. The first error (the server unreachable, the mlflow package
missing, a refused request, the end-of-job bound) turns tracking off for the rest of the job and
appends one ``warning`` event saying so. MLflow's client would retry a request for minutes;
:data:`CLIENT_ENV` (applied unless the environment sets them) makes an unreachable server cost
seconds.

Torch-free; ``mlflow`` is imported only when a job is tracked, in the process that runs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
from worker.outbox import Outbox

if TYPE_CHECKING:
    from mlflow.entities import Metric
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
_METRIC_BATCH = 1000  # metrics per log_batch request (MLflow's MAX_METRICS_PER_BATCH)
_KEY_CHARS = re.compile(r"[^\w\-. /:]")

# Drop order when the queue is full: epochs first (finest grain), then megabatches.
_EPOCH_RANK, _MEGABATCH_RANK = 0, 1


class TrackingError(Exception):
    """A tracking problem with a message for the job's owner."""


class _Abandoned(Exception):
    """The job stopped waiting for this sender: make no more requests."""


# What the sender thread is asked to do, in order.
@dataclass(frozen=True)
class _Open:
    resumed_after: int


@dataclass(frozen=True)
class _Adopt:
    run: MlflowRun


@dataclass(frozen=True)
class _Epoch:
    event: EpochEnded
    at_ms: int


@dataclass(frozen=True)
class _Megabatch:
    metrics: MegabatchMetrics
    at_ms: int


@dataclass(frozen=True)
class _Final:
    completed: bool


@dataclass(frozen=True)
class _Terminate:
    status: str


_Item = _Open | _Adopt | _Epoch | _Megabatch | _Final | _Terminate


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


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobTracking:
    """One job's MLflow run: an engine callback (``run(..., callbacks=[..., tracking])``) that never
    raises, except the progress sink's :class:`~app_engine.runner.StopRun` out of a warning, and
    never waits on MLflow (a background thread sends).

    Off (every call returns at once, mlflow is not imported, no thread) when the settings have no
    tracking URI. ``warn`` is where warning events go while the engine runs (the worker sets it to
    the job's progress sink, so a warning is in order with the run's events): the sender's error is
    reported from the next event's callback. Without it, and once the run ended, the event is
    appended to the store directly.

    The delivery ends the sending with :meth:`end` (or :meth:`close` when it has no outcome, e.g.
    it raised): both wait, up to ``drain_timeout_s``, for the queue to be sent.
    """

    def __init__(self, record: JobRecord, *, settings: Settings, store: JobStore, out_dir: Path,
                 queue_limit: int | None = None, drain_timeout_s: float | None = None) -> None:
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
        # Defaults: 1000 updates (hours of epochs, a few hundred KB); 60 s (a dead server costs a few
        # requests' timeouts, CLIENT_ENV, before it counts as unreachable anyway).
        self.queue_limit = settings.mlflow_queue_limit if queue_limit is None else queue_limit
        self.drain_timeout_s = settings.mlflow_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.warn: Callable[[Event], None] | None = None
        self.run: MlflowRun | None = None
        self.failed = False
        self.ended = False
        self._outbox: Outbox[_Item] | None = None
        self._lock = threading.Lock()  # failed and the pending warning: set by either thread
        self._pending: WarningIssued | None = None  # a warning the sender could not emit itself
        self._overflow_reported = False
        # The sender thread's own state.
        self._client: MlflowClient | None = None
        self._steps: dict[str, set[int]] = {MEGABATCH_MARK: set(), EPOCH_MARK: set(), CER: set()}
        # The CER after megabatch _cer_at; None when unknown (a retry could not learn the earlier
        # megabatches', or a megabatch update was dropped): result.json fills it in at the end.
        self._cer: int | None = 0
        self._cer_at = 0

    @property
    def enabled(self) -> bool:
        return self.uri is not None and not self.failed

    @property
    def dropped(self) -> int:
        """Metric updates dropped because the queue was full."""
        return self._outbox.dropped if self._outbox is not None else 0

    def __call__(self, event: Event) -> None:
        """The engine's callback (its thread): queue what the run needs; never waits on MLflow."""
        self._report_pending()
        if not self.enabled or self.ended:
            return
        if self._outbox is None:
            self._put(_Open(event.resumed_after if isinstance(event, RunStarted) else 0))
        if isinstance(event, EpochEnded):
            self._put(_Epoch(event, _now_ms()), rank=_EPOCH_RANK)
        elif isinstance(event, MegabatchEnded):
            self._put(_Megabatch(event.metrics, _now_ms()), rank=_MEGABATCH_RANK)
        elif isinstance(event, RunEnded):
            self._put(_Final(completed=not event.stopped))

    def end(self, outcome: str | None) -> None:
        """End the MLflow run as the job ended (``succeeded`` -> FINISHED, ``failed`` -> FAILED,
        ``cancelled`` -> KILLED), once; any other outcome (the delivery stood down or lost the
        job) leaves it running for the delivery that continues the job. Either way waits, up to
        ``drain_timeout_s``, for everything queued to reach MLflow, then stops the sender."""
        if self.ended:
            return
        self.ended = True
        self.warn = None  # the run is over: the store takes any warning from here on
        status = RUN_STATUS.get(outcome or "")
        if self._outbox is None:
            self._report_pending()
            return
        if status is not None and self.enabled:
            self._outbox.put(_Terminate(status))
        waited = time.monotonic()
        if not self._outbox.close(self.drain_timeout_s):
            waiting = "its last updates" + (" and the end of its run" if status else "")
            self._give_up(TrackingError(f"the server did not take {waiting} within "
                                        f"{self.drain_timeout_s:g} s of the job's end"))
        else:
            log.debug("job %s: MLflow queue sent in %.2f s", self.job_id, time.monotonic() - waited)
        self._report_pending()

    def close(self) -> None:
        """The delivery ends without an outcome for the job (it raised, or lost the job): send
        what is queued (bounded), leave the run running for the delivery that continues it."""
        self.end(None)

    def end_abandoned(self) -> None:
        """The job fails without a run in this delivery (its workers died too often): end the
        MLflow run an earlier delivery opened, FAILED."""
        if not self.enabled or self.previous is None or self.ended:
            return
        self._put(_Adopt(self.previous))
        self.end(FAILED)

    def join_sender(self, timeout_s: float) -> bool:
        """Wait for the sender thread to exit after :meth:`end` (an abandoned one exits once its
        request returns, making no other); True when it has, or never started."""
        return self._outbox.join(timeout_s) if self._outbox is not None else True

    # --- the queue (the engine's thread) ------------------------------------------------------

    def _put(self, item: _Item, *, rank: int | None = None) -> None:
        if self._outbox is None:
            self._outbox = Outbox(self._send, limit=self.queue_limit, name=f"mlflow-{self.job_id}")
        if self._outbox.put(item, rank=rank) is not None and not self._overflow_reported:
            self._overflow_reported = True
            assert self.uri is not None
            log.warning("job %s: MLflow at %s is slower than training; dropping queued updates", self.job_id,
                        redact(self.uri))
            self._emit(WarningIssued(
                source=SOURCE,
                message=f"MLflow tracking at {redact(self.uri)} is slower than training: with "
                f"{self.queue_limit} updates waiting, the oldest per-epoch metrics (then per-megabatch) are "
                "dropped from the queue, and logged from the run's result when it ends; training does not wait",
            ))

    def _report_pending(self) -> None:
        with self._lock:
            event, self._pending = self._pending, None
        if event is not None:
            self._emit(event)

    def _emit(self, event: WarningIssued) -> None:
        if self.warn is not None:
            self.warn(event)  # the progress sink: may raise StopRun, which the engine expects
            return
        try:
            self.store.append_event(self.job_id, event)
        except RedisError as err:
            log.warning("job %s: could not record the tracking warning (%s)", self.job_id, err)

    # --- the sender thread --------------------------------------------------------------------

    def _send(self, items: list[_Item]) -> None:
        """Send ``items`` in order; consecutive metric updates go as one ``log_batch``."""
        metrics: list[Metric] = []
        try:
            for item in items:
                if self.failed:
                    return
                if isinstance(item, _Epoch):
                    metrics += self._epoch_metrics(item.event, item.at_ms)
                elif isinstance(item, _Megabatch):
                    metrics += self._megabatch_metrics(item.metrics, item.at_ms)
                else:
                    self._log_metrics(metrics)
                    metrics = []
                    if isinstance(item, _Open):
                        self._open(item.resumed_after)
                    elif isinstance(item, _Adopt):
                        self._client, self.run = self._new_client(), item.run
                    elif isinstance(item, _Final):
                        self._log_final(item.completed)
                    elif self.run is not None:
                        self._api().set_terminated(self.run.run_id, item.status)
            self._log_metrics(metrics)
        except _Abandoned:
            log.info("job %s: MLflow sender abandoned", self.job_id)
        except Exception as exc:  # noqa: BLE001 -- tracking never fails the job
            if self._outbox is None or not self._outbox.abandoned:
                self._give_up(exc)

    def _api(self) -> MlflowClient:
        """The client, for one more request; raises :class:`_Abandoned` once the job stopped waiting."""
        if self._outbox is not None and self._outbox.abandoned:
            raise _Abandoned
        if self._client is None:
            raise TrackingError("no MLflow run")
        return self._client

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
        self._client = self._new_client()
        run = self._existing_run()
        if run is None:
            run = self._api().create_run(self._experiment_id(), run_name=self.job_id,
                                         tags={"job_id": self.job_id, "api_key_id": self.owner})
            self._cer, self._cer_at = (0 if resumed_after == 0 else None), resumed_after
        else:
            log.info("job %s: continuing MLflow run %s", self.job_id, run.info.run_id)
            if run.info.status != "RUNNING":
                self._api().update_run(run.info.run_id, status="RUNNING")
            self._learn_steps(run.info.run_id, resumed_after)
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        self.run = MlflowRun(run_id=run_id, experiment_id=experiment_id,
                             url=run_url(self.public_url, experiment_id, run_id))
        self._log_params(run_id)
        if self.previous != self.run:
            try:
                self.store.set_mlflow_run(self.job_id, self.run)
            except RedisError as exc:  # the run is still tracked; a retry finds it by its job_id tag
                log.warning("job %s: could not record MLflow run %s (%s)", self.job_id, run_id, exc)

    def _existing_run(self) -> Any:
        from mlflow.exceptions import MlflowException

        if self.previous is not None:
            try:
                run = self._api().get_run(self.previous.run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                return run
        if self.retried:  # opened by a delivery that could not record it
            experiment = self._api().get_experiment_by_name(self.experiment)
            if experiment is not None and experiment.lifecycle_stage == "active":
                runs = self._api().search_runs([experiment.experiment_id], f"tags.job_id = '{self.job_id}'",
                                               max_results=1)
                if runs:
                    return runs[0]
        return None

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._api().get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return str(self._api().create_experiment(self.experiment))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = self._api().get_experiment_by_name(self.experiment)  # another worker made it meanwhile
            if experiment is None:
                raise TrackingError(f"could not create the MLflow experiment {self.experiment!r}")
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"the MLflow experiment {self.experiment!r} is deleted: restore it or name "
                                "another in tracking.mlflow_experiment")
        return str(experiment.experiment_id)

    def _learn_steps(self, run_id: str, resumed_after: int) -> None:
        """What an earlier delivery logged: steps to skip, and the CER so far."""
        for key in self._steps:
            self._steps[key] = {m.step for m in self._api().get_metric_history(run_id, key)}
        self._cer, self._cer_at = 0, resumed_after
        if resumed_after:
            cer = [m for m in self._api().get_metric_history(run_id, CER) if m.step == resumed_after]
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
            self._api().log_batch(run_id, params=params[start:start + _BATCH])

    # --- metrics and files (the sender thread) ------------------------------------------------

    def _log_metrics(self, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), _METRIC_BATCH):
            self._api().log_batch(self._run_id(), metrics=metrics[start:start + _METRIC_BATCH])

    @staticmethod
    def _metrics(values: Mapping[str, Any], step: int, at_ms: int) -> list[Metric]:
        """The finite numbers of ``values`` as metrics at ``step``."""
        from mlflow.entities import Metric

        return [Metric(_key(k), float(v), at_ms, step) for k, v in values.items()
                if isinstance(v, int | float) and math.isfinite(v)]

    def _new_metrics(self, mark: str, step: int, values: Mapping[str, Any], at_ms: int) -> list[Metric]:
        """:meth:`_metrics`, unless the ``mark`` key has that step already (counted as logged from
        here on: a request that fails stops tracking anyway)."""
        if step in self._steps[mark]:
            return []
        self._steps[mark].add(step)
        return self._metrics(values, step, at_ms)

    def _epoch_metrics(self, event: EpochEnded, at_ms: int) -> list[Metric]:
        step = (event.megabatch - 1) * event.epochs + event.epoch
        return self._new_metrics(EPOCH_MARK, step, {k: getattr(event, n) for k, n in EPOCH_METRICS.items()}, at_ms)

    def _megabatch_metrics(self, metrics: MegabatchMetrics, at_ms: int, cer: int | None = None) -> list[Metric]:
        step = metrics.index
        if cer is None:  # live: the CER goes on from the megabatch before, when that one was seen
            if self._cer is not None and self._cer_at == step - 1:
                self._cer += metrics.test_errors
            else:
                self._cer = None
            self._cer_at, cer = step, self._cer
        out = self._new_metrics(MEGABATCH_MARK, step, {n: getattr(metrics, n) for n in MEGABATCH_METRICS}, at_ms)
        if cer is not None:
            out += self._new_metrics(CER, step, {CER: cer}, at_ms)
        return out

    def _log_final(self, completed: bool) -> None:
        """The run ended: fill any megabatch or epoch not logged (an earlier delivery ended
        without it, or the queue dropped it) from result.json; for a completed run the final
        per-layer density and the files. A stopped run is filled in only when this delivery
        dropped updates (it may have stopped because another worker took the job over)."""
        if not completed and not self.dropped:
            return
        result = json.loads((self.out_dir / "result.json").read_text())
        entries = [MegabatchMetrics.from_dict(entry) for entry in result.get("megabatches", [])]
        epochs = int(result.get("config", {}).get("training", {}).get("epochs") or 0)
        now, cer = _now_ms(), 0
        metrics: list[Metric] = []
        for entry in entries:
            cer += entry.test_errors
            metrics += self._megabatch_metrics(entry, now, cer)
            for epoch in entry.epochs:
                values = {key: epoch.get(name) for key, name in EPOCH_METRICS.items()}
                step = (entry.index - 1) * (epochs or len(entry.epochs)) + int(epoch["epoch"])
                metrics += self._new_metrics(EPOCH_MARK, step, values, now)
        if completed and entries:
            last = entries[-1]
            metrics += self._metrics({f"layer_density/{n}": d for n, d in last.layer_density.items()}, last.index, now)
        self._log_metrics(metrics)
        if not completed:
            return
        for name in ARTIFACTS:
            path = self.out_dir / name
            if path.is_file():
                self._api().log_artifact(self._run_id(), str(path))

    def _run_id(self) -> str:
        if self.run is None:
            raise TrackingError("no MLflow run")
        return self.run.run_id

    # --- failure (either thread) --------------------------------------------------------------

    def _give_up(self, exc: BaseException) -> None:
        """Turn tracking off for the rest of the job and say so once, in the job's events (from
        the engine's thread, or the store after the run: see :meth:`_report_pending`)."""
        with self._lock:
            if self.failed:
                return
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
        with self._lock:
            self._pending = event
