"""The model's one thread. Protocol servers (LSP, websocket) submit jobs; the worker runs each
owner's (a connection's) jobs in submission order, so an edit is never reordered behind or ahead
of a completion, and batches the forward passes of different owners' jobs (Worker).

Jobs are cancelled cooperatively: a job gets a Ticket and passes `ticket.should_stop` to the
engine, which checks it between token steps and between encode chunks. A ticket stops when it
is cancelled, when the worker closes, or when the document it was for has been edited since
(`Worker.bump`, called on the protocol thread the moment an edit arrives, before the edit
itself reaches the worker).
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
from collections import deque
from types import GeneratorType
from typing import Any, Callable

from livekv.incremental import batch
from livekv.incremental.batch import Scheduler

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
    """One thread that owns the engine. `load` builds the engine on that thread (first job).

    A job is fn(engine, *args). One that returns a generator is a stepper (batch.py: it yields
    forward passes): with `batch` on, the steppers of every owner run together in a Scheduler,
    one forward per step for all of them, and new ones join between steps (continuous
    batching). Between two steps the worker starts the next job of every owner that has none
    running, oldest first, and when that job is plain and ends at once (an edit's bookkeeping),
    the owner's next one too (the completion behind it). So a plain job (a close, stats) waits
    for one step at most, and an encode (an edit, an open, a paste) joins the batch chunk by
    chunk instead of holding the model. An owner's jobs still run one at a time, in the order
    it submitted them. With `batch` off, every job runs alone to its end, owners taking turns
    (the serial server)."""

    def __init__(self, load: Callable[[], Any], batch: bool = True, first_passes_first: bool = False):
        self._load, self.batch, self.first_passes_first = load, batch, first_passes_first
        self.engine = None
        self.load_error: BaseException | None = None
        self.closing = False
        # one FIFO per owner (a connection): each client's own order holds, and a client with
        # 30 queued requests delays another's by one job (unbatched) or one step (batched) at most
        self._queues: dict[Any, deque] = {}
        self._busy: set = set()        # owners with a stepper in the scheduler (worker thread)
        self._turns: deque = deque()   # unbatched: owners with queued jobs, the next to serve first
        self._ready = threading.Condition()
        self._gen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.busy_since: float | None = None
        self.scheduler: Scheduler | None = None
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
        """Run fn(engine, *args) on the worker after everything `owner` submitted before it."""
        fut: cf.Future = cf.Future()
        with self._ready:
            if self.closing:
                fut.set_exception(RuntimeError("the server is shutting down"))
                return fut
            if owner not in self._queues:
                self._queues[owner] = deque()
                if not self.batch:
                    self._turns.append(owner)
            self._queues[owner].append((next(self._seq), fn, args, ticket, fut, owner))
            self._ready.notify()
        return fut

    def queued(self) -> int:
        """Jobs submitted and not started yet."""
        with self._ready:
            return sum(len(q) for q in self._queues.values())

    def _take(self, owner):
        """The owner's next job (the lock held)."""
        q = self._queues[owner]
        item = q.popleft()
        if not q:
            del self._queues[owner]
        return item

    def _next_batch(self) -> list | None:
        """The jobs to start before the next step: every idle owner's next one, oldest first.
        Waits while there is nothing to do; None once closing with nothing running."""
        with self._ready:
            while True:
                idle = [o for o in self._queues if self._idle(o)]
                running = self.scheduler is not None and len(self.scheduler) > 0
                if self.closing and not running:
                    return None
                if idle or running:
                    break
                self._ready.wait()
            return sorted((self._take(o) for o in idle), key=lambda item: item[0])

    def _idle(self, owner) -> bool:
        """Whether owner has a job waiting and none running (the lock held)."""
        return owner in self._queues and owner not in self._busy

    def _follow(self, owner):
        """The owner's next job when it has one and nothing running; else None."""
        with self._ready:
            return self._take(owner) if self._idle(owner) else None

    def _next_alone(self):
        """Unbatched: the next job, round-robin over owners; None once closing."""
        with self._ready:
            while not self._turns and not self.closing:
                self._ready.wait()
            if self.closing:
                return None
            owner = self._turns.popleft()
            item = self._take(owner)
            if owner in self._queues:
                self._turns.append(owner)
            return item

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as e:  # reported to every job, so clients see why
            self.load_error = e
            log.error("could not load the model: %s", e)
        if not self.batch or self.load_error is not None:
            while (item := self._next_alone()) is not None:
                self._start(item)
            return
        while (items := self._next_batch()) is not None:
            for item in items:
                self._start(item)
                # a plain job (an edit's bookkeeping, stats) ends at once: its owner's next job (the
                # completion that follows an edit) starts now, not a whole batched step later
                while (item := self._follow(item[5])) is not None:
                    self._start(item)
            if self.scheduler is not None and len(self.scheduler):
                try:
                    self.scheduler.step()
                except Exception:  # the steppers in it were told; the worker goes on
                    log.exception("a batched forward failed")
        if self.scheduler is not None:
            self.scheduler.cancel_all(RuntimeError("the server is shutting down"))

    def _start(self, item) -> None:
        """Run a job: a plain one to its end; a stepper alone (unbatched) or into the scheduler."""
        _, fn, args, ticket, fut, owner = item
        if not fut.set_running_or_notify_cancel():
            return
        if self.load_error is not None:
            fut.set_exception(RuntimeError(f"the model could not be loaded: {self.load_error}"))
            return
        if ticket is not None:
            ticket.started_at = time.perf_counter()
        self.busy_since = time.perf_counter()
        try:
            out = fn(self.engine, *args)
            if not isinstance(out, GeneratorType):
                fut.set_result(out)
            elif not self.batch:
                fut.set_result(batch.alone(self.engine.model, out))
            else:
                self._join(out, fut, owner)
        except BaseException as e:
            fut.set_exception(e)
        finally:
            self.busy_since = None

    def _join(self, stepper, fut: cf.Future, owner) -> None:
        model = self.engine.model
        if self.scheduler is None or (self.scheduler.model is not model and not len(self.scheduler)):
            # the first, or the engine was replaced (LSP settings)
            self.scheduler = Scheduler(model, self.first_passes_first)

        def done(value, error) -> None:
            self._busy.discard(owner)
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)
        self._busy.add(owner)  # before add: a stepper may end at once (done runs inside add)
        self.scheduler.add(stepper, done)

    def close(self, timeout: float = 0.5) -> None:
        """Stop: running jobs see should_stop() at their next step; queued jobs are dropped."""
        with self._ready:
            self.closing = True
            dropped = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._turns.clear()
            self._ready.notify_all()
        for item in dropped:
            item[4].cancel()
        self._thread.join(timeout)
