"""The model's one thread. Protocol servers (LSP, websocket) submit jobs; the worker runs them in
submission order, so an edit is never reordered behind or ahead of a completion.

Jobs are cancelled cooperatively: a job gets a Ticket and passes `ticket.should_stop` to the
engine, which checks it between token steps and between encode chunks. A ticket stops when it
is cancelled, when the worker closes, or when the document it was for has been edited since
(`Worker.bump`, called on the protocol thread the moment an edit arrives, before the edit
itself reaches the worker).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger("livekv.worker")


class Ticket:
    """Cancellation for one job."""

    def __init__(self, worker: "Worker", uri: str | None = None):
        self.worker, self.uri = worker, uri
        self.generation = worker.generation(uri) if uri else 0
        self.event = threading.Event()
        self.started_at: float | None = None

    def cancel(self) -> None:
        self.event.set()

    @property
    def stale(self) -> bool:
        return self.uri is not None and self.worker.generation(self.uri) != self.generation

    def should_stop(self) -> bool:
        return self.event.is_set() or self.worker.closing or self.stale


class Batch:
    """The arguments of one queued job that keep arriving until it starts (the didChange
    notifications for one document, during an edit storm): added on the event loop, taken all at
    once by the job on the worker. Nothing is added once it has started: a new batch begins."""

    def __init__(self, first):
        self._items, self._lock, self.started = [first], threading.Lock(), False

    def add(self, item) -> bool:
        with self._lock:
            if self.started:
                return False
            self._items.append(item)
            return True

    def take(self) -> list:
        with self._lock:
            self.started = True
            return self._items


class Worker:
    """One thread that owns the engine. `load` builds the engine on that thread (first job)."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load
        self.engine = None
        self.load_error: BaseException | None = None
        self.closing = False
        # one FIFO per owner (a connection), served round-robin: a client with 30 queued
        # requests delays another's by one job at most, while each client's own order holds
        self._queues: dict[Any, deque] = {}
        self._turns: deque = deque()  # owners with queued jobs, the next one to serve first
        self._ready = threading.Condition()
        self._gen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="livekv-worker", daemon=True)
        self._thread.start()

    # generations: bumped on the protocol thread as soon as an edit for uri arrives
    def generation(self, uri: str) -> int:
        with self._lock:
            return self._gen.get(uri, 0)

    def bump(self, uri: str) -> None:
        with self._lock:
            self._gen[uri] = self._gen.get(uri, 0) + 1

    def ticket(self, uri: str | None = None) -> Ticket:
        return Ticket(self, uri)

    def submit(self, fn: Callable[..., Any], *args, ticket: Ticket | None = None, owner: Any = None) -> cf.Future:
        """Run fn(engine, *args) on the worker after everything `owner` submitted before it;
        owners take turns, one job each."""
        fut: cf.Future = cf.Future()
        with self._ready:
            if self.closing:
                fut.set_exception(RuntimeError("the server is shutting down"))
                return fut
            if owner not in self._queues:
                self._queues[owner] = deque()
                self._turns.append(owner)
            self._queues[owner].append((fn, args, ticket, fut))
            self._ready.notify()
        return fut

    def _next(self):
        """The next job, round-robin over owners; None once closing."""
        with self._ready:
            while not self._turns and not self.closing:
                self._ready.wait()
            if self.closing:
                return None
            owner = self._turns.popleft()
            q = self._queues[owner]
            item = q.popleft()
            if q:
                self._turns.append(owner)
            else:
                del self._queues[owner]
            return item

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as e:  # reported to every job, so clients see why
            self.load_error = e
            log.error("could not load the model: %s", e)
        while (item := self._next()) is not None:
            fn, args, ticket, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            if self.load_error is not None:
                fut.set_exception(RuntimeError(f"the model could not be loaded: {self.load_error}"))
                continue
            if ticket is not None:
                ticket.started_at = time.perf_counter()
            self.busy_since = time.perf_counter()
            try:
                fut.set_result(fn(self.engine, *args))
            except BaseException as e:
                fut.set_exception(e)
            finally:
                self.busy_since = None

    def close(self, timeout: float = 0.5) -> None:
        """Stop: running jobs see should_stop() at their next step; queued jobs are dropped."""
        with self._ready:
            self.closing = True
            dropped = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._turns.clear()
            self._ready.notify_all()
        for item in dropped:
            item[3].cancel()
        self._thread.join(timeout)
