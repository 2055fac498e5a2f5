"""One worker process per GPU on one host: ``anytime-prune worker --gpus all|0,1,...``.

Docker (and compose's ``--scale``) does not hand out GPUs: every replica of a service that
reserves ``count: 1`` gets the same first device. So one container reserves all the GPUs it
should use, and this supervisor runs one ``anytime-prune worker`` per device, each pinned with
``CUDA_VISIBLE_DEVICES=<device>`` (inside it the GPU is ``cuda:0``) and named after it, restarts a
child that dies, and stops them all on SIGTERM/SIGINT. The parent never imports torch or Celery:
it finds the devices with ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

# Celery's warm shutdown finishes the epoch in progress; compose gives a worker 2 minutes
# (stop_grace_period) before SIGKILL, so the children get a little less and are killed first.
STOP_GRACE_S = 100.0
# A child that crashes right away is restarted after 1 s, then 2, 4, ... up to a minute; one that
# ran for longer than BACKOFF_RESET_S before dying starts the sequence again.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
BACKOFF_RESET_S = 60.0


class NoGpuError(RuntimeError):
    """``--gpus all`` on a host where no GPU is visible."""


def _nvidia_smi_devices() -> list[str]:
    """The indices of the GPUs ``nvidia-smi -L`` lists ("GPU 0: NVIDIA H100 (UUID: ...)")."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, flags=re.MULTILINE)


def resolve_devices(
    spec: str, env: Mapping[str, str] | None = None, list_gpus: Callable[[], list[str]] = _nvidia_smi_devices
) -> list[str]:
    """The devices of ``--gpus``: ``all`` (those CUDA_VISIBLE_DEVICES already names, else every
    GPU ``nvidia-smi -L`` lists) or a comma-separated list of ids (indices or GPU UUIDs)."""
    env = os.environ if env is None else env
    spec = spec.strip()
    if spec == "all":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            # CUDA stops at the first invalid entry ("-1" hides every GPU).
            devices = []
            for item in (part.strip() for part in visible.split(",")):
                if not item or item.startswith("-"):
                    break
                devices.append(item)
        else:
            devices = list_gpus()
        if not devices:
            raise NoGpuError(
                "--gpus all: no GPU is visible (CUDA_VISIBLE_DEVICES is empty or nvidia-smi -L lists none); "
                "name the devices (--gpus 0,1) or run a worker without --gpus"
            )
        return devices
    devices = [part.strip() for part in spec.split(",")]
    if not spec or any(not d or not re.fullmatch(r"[A-Za-z0-9-]+", d) for d in devices):
        raise ValueError(f"--gpus {spec!r}: expected 'all' or comma-separated device ids such as 0,1")
    if len(set(devices)) != len(devices):
        raise ValueError(f"--gpus {spec!r}: a device is listed twice")
    return devices


def node_name(device: str, queue: str, hostname: str | None = None) -> str:
    """The Celery node name of the worker on ``device``: ``gpu0@%h`` by default; with
    ``--hostname name@host`` it is ``name0@host`` (every node name stays unique)."""
    base, _, host = (hostname or f"{queue}@%h").partition("@")
    return f"{base}{device}@{host or '%h'}"


@dataclass(frozen=True)
class ChildSpec:
    """What the supervisor runs for one device."""

    device: str
    argv: list[str]
    env: dict[str, str]


def child_specs(
    devices: Sequence[str], queue: str, *, loglevel: str = "INFO", hostname: str | None = None,
    env: Mapping[str, str] | None = None, executable: str = sys.executable,
) -> list[ChildSpec]:
    """One ``anytime-prune worker`` per device, each seeing only its device."""
    base_env = dict(os.environ if env is None else env)
    specs = []
    for device in devices:
        argv = [
            executable, "-m", "anytime_prune.cli", "worker", "--queue", queue, "--loglevel", loglevel,
            "--hostname", node_name(device, queue, hostname),
        ]
        specs.append(ChildSpec(device, argv, {**base_env, "CUDA_VISIBLE_DEVICES": device}))
    return specs


def _die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    """Keeps one process per :class:`ChildSpec` running until :meth:`stop`."""

    specs: list[ChildSpec]
    grace_s: float = STOP_GRACE_S
    poll_s: float = 0.5
    backoff_min_s: float = BACKOFF_MIN_S
    _children: list[_Child] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def _spawn(self, child: _Child) -> None:
        # Each child in its own session: a terminal's Ctrl-C reaches only the supervisor, and
        # stopping a child signals its whole group, which includes the pool process running a job.
        child.proc = subprocess.Popen(
            child.spec.argv, env=child.spec.env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        child.started = time.monotonic()
        log.info("started the worker on device %s (pid %d)", child.spec.device, child.proc.pid)

    def pids(self) -> dict[str, int]:
        """The pid of each device's running child (absent while one waits to restart)."""
        return {c.spec.device: c.proc.pid for c in self._children if c.proc is not None and c.proc.poll() is None}

    def restarts(self) -> dict[str, int]:
        return {c.spec.device: c.restarts for c in self._children}

    def stop(self) -> None:
        """Ask :meth:`run` to stop every child and return (safe from a signal handler or thread)."""
        self._stopping.set()

    def _check(self, child: _Child, now: float) -> None:
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                return
            ran = now - child.started
            # The pool child of a killed worker may live on in its group: end it before a restart.
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.backoff_s = (
                self.backoff_min_s if ran >= BACKOFF_RESET_S or not child.backoff_s
                else min(child.backoff_s * 2, BACKOFF_MAX_S)
            )
            child.restart_at = now + child.backoff_s
            child.proc = None
            log.warning(
                "the worker on device %s exited with %s after %.0f s; restarting it in %.0f s",
                child.spec.device, code, ran, child.backoff_s,
            )
        elif now >= child.restart_at:
            child.restarts += 1
            self._spawn(child)

    def run(self) -> int:
        """Start every child, restart those that die, and stop them all once :meth:`stop` is called."""
        self._children = [_Child(spec) for spec in self.specs]
        try:
            for child in self._children:
                self._spawn(child)
            while not self._stopping.wait(self.poll_s):
                now = time.monotonic()
                for child in self._children:
                    self._check(child, now)
        finally:
            self._stop_children()
        return 0

    def _stop_children(self) -> None:
        """SIGTERM to every child's group at once (Celery's warm shutdown), SIGKILL after the grace."""
        running = [c.proc for c in self._children if c.proc is not None]
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("the worker pid %d did not stop within %.0f s; killing it", proc.pid, self.grace_s)
        for proc in running:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def supervise(
    gpus: str, queue: str, *, loglevel: str = "INFO", hostname: str | None = None, grace_s: float = STOP_GRACE_S
) -> int:
    """``anytime-prune worker --gpus``: run one worker per device until SIGTERM or SIGINT."""
    devices = resolve_devices(gpus)
    supervisor = Supervisor(child_specs(devices, queue, loglevel=loglevel, hostname=hostname), grace_s=grace_s)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("one worker on queue %s per device: %s", queue, ", ".join(devices))
    return supervisor.run()
