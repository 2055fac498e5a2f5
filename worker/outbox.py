"""An outbox: items one thread produces (the training thread) and one background thread sends, in
order, so that the producer never waits on the receiver.

:meth:`Outbox.put` never blocks. Items are kept in order; the sender takes everything waiting at
once (:meth:`Outbox.__init__`'s ``send`` gets a list), which lets it batch what piled up while the
receiver was slow. Only items with a ``rank`` count against ``limit``; past it, the oldest waiting
item of the lowest rank is dropped (and returned to the producer, which decides what to say about
it). Items without a rank (opening, closing a run) are never dropped.

:meth:`Outbox.close` waits, up to a bound, for everything to be sent, then stops the thread; a
sender still busy after the bound is *abandoned*: :attr:`Outbox.abandoned` turns true, which the
sender checks before each request it makes, and nothing more is handed to it. The thread is a
daemon: one stuck in a request never holds the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry(Generic[T]):
    item: T
    rank: int | None  # None: never dropped, not counted against the limit


class Outbox(Generic[T]):
    """A bounded, never-blocking queue with one sender thread (started with the first item)."""

    def __init__(self, send: Callable[[list[T]], None], *, limit: int, name: str) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self._send = send
        self.limit = limit
        self.name = name
        self.dropped = 0
        self.abandoned = False
        self._entries: deque[_Entry[T]] = deque()
        self._counted = 0  # entries with a rank
        self._busy = False  # the sender holds items it has not finished sending
        self._closing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Items not yet taken by the sender."""
        with self._cond:
            return len(self._entries)

    def put(self, item: T, *, rank: int | None = None) -> T | None:
        """Queue ``item``; returns the item dropped to make room (None when nothing was). An item
        put after :meth:`close` began is ignored."""
        with self._cond:
            if self._closing:
                log.debug("%s: closed; ignoring an item", self.name)
                return None
            self._entries.append(_Entry(item, rank))
            dropped = None
            if rank is not None:
                self._counted += 1
                if self._counted > self.limit:
                    dropped = self._drop_one()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return dropped

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything put so far is sent (or ``timeout_s`` passed); True when it is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._entries or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float) -> bool:
        """Refuse new items, wait up to ``timeout_s`` for the waiting ones to be sent, stop the
        thread. True when all was sent; otherwise the rest is forgotten and the sender abandoned."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        idle = self.wait_idle(timeout_s)
        with self._cond:
            if not idle:
                self.abandoned = True
                self._entries.clear()
                self._counted = 0
            self._cond.notify_all()
        return idle

    def join(self, timeout_s: float) -> bool:
        """Wait for the sender thread to exit (after :meth:`close`; an abandoned one exits once
        its request returns); True when it has, or never started."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def _drop_one(self) -> T:
        lowest = min(e.rank for e in self._entries if e.rank is not None)
        for i, entry in enumerate(self._entries):
            if entry.rank == lowest:
                del self._entries[i]
                self._counted -= 1
                self.dropped += 1
                return entry.item
        raise AssertionError("a counted entry must exist")  # pragma: no cover

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._entries and not self._closing:
                    self._cond.wait()
                if not self._entries or self.abandoned:
                    return
                batch = [e.item for e in self._entries]
                self._entries.clear()
                self._counted = 0
                self._busy = True
            try:
                self._send(batch)
            except Exception:  # the sender handles its own errors: this one is a bug, not the receiver's
                log.exception("%s: sending %d items failed", self.name, len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
