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
import queue
import threading
import time
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


class Worker:
    """One thread that owns the engine. `load` builds the engine on that thread (first job)."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load
        self.engine = None
        self.load_error: BaseException | None = None
        self.closing = False
        self._q: queue.Queue = queue.Queue()
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

    def submit(self, fn: Callable[..., Any], *args, ticket: Ticket | None = None) -> cf.Future:
        """Run fn(engine, *args) on the worker after everything submitted before it."""
        fut: cf.Future = cf.Future()
        if self.closing:
            fut.set_exception(RuntimeError("the server is shutting down"))
            return fut
        self._q.put((fn, args, ticket, fut))
        return fut

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as e:  # reported to every job, so clients see why
            self.load_error = e
            log.error("could not load the model: %s", e)
        while True:
            item = self._q.get()
            if item is None:
                return
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
        self.closing = True
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[3].cancel()
        self._q.put(None)
        self._thread.join(timeout)
