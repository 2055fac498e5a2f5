"""Training batches of a set in host memory, gathered ahead of the step that uses them.

A ``streamed`` dataset (:mod:`app_engine.data.disk_cache`) stays in host memory, over a memory-
mapped file: every batch is gathered there (``x[idx]``, which may read pages from disk) and copied
to the device. Done in line, the device waits for both. :func:`device_batches` does them ahead:

- on CUDA, with data in host memory, a background thread gathers the next ``depth`` batches into
  page-locked (pinned) buffers and starts their copies on a side CUDA stream; the training stream
  waits for a batch's copy only when it uses it (an event, not a host synchronisation). A pinned
  buffer is refilled only once the copy out of it has finished (its event), and each device batch
  is marked as used by the training stream, so the allocator never hands its memory to the next
  copy while a step still reads it;
- everywhere else (data already on the device, or a CPU run), it gathers each batch when asked,
  exactly as ``x[idx]`` does: nothing to overlap with on a CPU that does the training itself.
  ``depth`` > 0 forces the thread there too (what the CPU tests of the thread use).

The batches are the same tensors, in the same order, as ``x[idx], y[idx]``: training on them gives
the same numbers as training on a set resident on the device. The thread only reads ``x``, ``y``
and the indices: it draws no random numbers, so augmentation (on the caller's generator) is
untouched.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass

import torch

# Batches gathered ahead on CUDA: one being used, one copied, one being gathered.
CUDA_DEPTH = 2
# How often a producer blocked on a full queue checks whether the consumer has gone.
_POLL_S = 0.05
THREAD_NAME = "app-batch-prefetch"


def default_depth(x: torch.Tensor, device: torch.device) -> int:
    """Batches to gather ahead: :data:`CUDA_DEPTH` for host data trained on CUDA, else 0 (in line)."""
    return CUDA_DEPTH if x.device.type == "cpu" and device.type == "cuda" else 0


def device_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Iterable[torch.Tensor],
    device: torch.device,
    *,
    depth: int | None = None,
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """``(x[idx], y[idx])`` on ``device`` for each ``idx`` of ``indices``, in order; ``x`` and ``y``
    live together (both on the device, or both in host memory). ``depth`` batches are gathered ahead
    by a background thread (default :func:`default_depth`). Close the iterator (or let it go) to stop
    the thread early; an error gathering a batch is raised where that batch would have been."""
    depth = default_depth(x, device) if depth is None else depth
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if depth == 0:
        return _in_line(x, y, indices, device)
    return _ahead(x, y, indices, device, depth)


def _in_line(x: torch.Tensor, y: torch.Tensor, indices: Iterable[torch.Tensor],
             device: torch.device) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    for idx in indices:
        idx = idx.to(x.device)
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


@dataclass
class _Ready:
    x: torch.Tensor
    y: torch.Tensor
    copied: torch.cuda.Event | None  # recorded on the copy stream after the batch's copy


@dataclass
class _Failed:
    error: BaseException


class _End:
    pass


def _ahead(x: torch.Tensor, y: torch.Tensor, indices: Iterable[torch.Tensor], device: torch.device,
           depth: int) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    ready: queue.Queue[_Ready | _Failed | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    gatherer = _Gatherer(x, y, device, slots=depth + 1)
    thread = threading.Thread(target=gatherer.run, args=(iter(indices), ready, stop), name=THREAD_NAME,
                              daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            if item.copied is not None:
                compute = torch.cuda.current_stream(device)
                compute.wait_event(item.copied)  # the device waits, not the host
                # Allocated on the copy stream, read on this one: its memory is not reused for a
                # later copy until this stream's work on it is done.
                item.x.record_stream(compute)
                item.y.record_stream(compute)
            yield item.x, item.y
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        thread.join()


class _Gatherer:
    """The background side: gathers each batch (into a pinned buffer on CUDA) and sends it on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, *, slots: int) -> None:
        self.x, self.y, self.device = x, y, device
        self.cuda = device.type == "cuda" and x.device.type == "cpu"
        self.slots = slots
        # Pinned buffers, one pair per slot, sized on the first batch (later ones are never larger
        # in a training epoch; a larger one gets new buffers).
        self.x_buf: list[torch.Tensor | None] = [None] * slots
        self.y_buf: list[torch.Tensor | None] = [None] * slots
        self.copied: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]

    def run(self, indices: Iterator[torch.Tensor], ready: queue.Queue[_Ready | _Failed | _End],
            stop: threading.Event) -> None:
        try:
            if self.stream is not None:
                with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                    self._produce(indices, ready, stop)
            else:
                self._produce(indices, ready, stop)
        except BaseException as exc:  # raised in the consumer, at the batch it concerns
            self._send(_Failed(exc), ready, stop)
            return
        self._send(_End(), ready, stop)

    def _produce(self, indices: Iterator[torch.Tensor], ready: queue.Queue[_Ready | _Failed | _End],
                 stop: threading.Event) -> None:
        for k, idx in enumerate(indices):
            if stop.is_set():
                return
            idx = idx.to(self.x.device)
            item = self._gather_cuda(k % self.slots, idx) if self.cuda else _Ready(self.x[idx], self.y[idx], None)
            if not self._send(item, ready, stop):
                return

    def _gather_cuda(self, slot: int, idx: torch.Tensor) -> _Ready:
        event = self.copied[slot]
        if event is not None:
            event.synchronize()  # the copy out of this slot's buffers has finished: refill them
        n = len(idx)
        x_buf, y_buf = self.x_buf[slot], self.y_buf[slot]
        if x_buf is None or y_buf is None or len(x_buf) < n:
            x_buf = self.x_buf[slot] = torch.empty((n, *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=True)
            y_buf = self.y_buf[slot] = torch.empty((n, *self.y.shape[1:]), dtype=self.y.dtype, pin_memory=True)
        xh = torch.index_select(self.x, 0, idx, out=x_buf[:n])
        yh = torch.index_select(self.y, 0, idx, out=y_buf[:n])
        xd = xh.to(self.device, non_blocking=True)  # on the copy stream (the thread's current one)
        yd = yh.to(self.device, non_blocking=True)
        copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        copied.record()
        self.copied[slot] = copied
        return _Ready(xd, yd, copied)

    @staticmethod
    def _send(item: _Ready | _Failed | _End, ready: queue.Queue[_Ready | _Failed | _End],
              stop: threading.Event) -> bool:
        """Put ``item`` in the queue, waiting for room; False if the consumer stopped meanwhile."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
