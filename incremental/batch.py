"""Forward passes as data, and the scheduler that runs many of them in one forward.

The work of one completion (decode.decoding) or one encode (encode.settling) is a *stepper*: a
generator that yields a Pass each time it needs the model and is sent back that pass's result
(or None, to wait a step: shared.py's encode of a group another stepper is encoding).
`alone` runs one stepper by itself, each pass a batch of one. A Scheduler runs many: each step,
the pending pass of every stepper goes into one Transformer.run, which reads the weights once
for all of their rows, and every stepper is advanced to its next pass. New steppers join between
steps (continuous batching); one that finishes or stops (its should_stop) leaves at once.

Passes of one precision (a document's Config.precision) share a forward, whose weight format is
chosen for all of its rows (Precision.set): a batch of decode steps may run other weights than
each would alone (int8 for int4, bf16 from SMALL rows on). At fp32 a pass gets the same tokens
batched as alone (tests/test_batch.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Generator

import torch

log = logging.getLogger("livekv.batch")

Stepper = Generator["Pass", Any, Any]


@dataclass
class Pass:
    """One forward pass of some queries over one cache.

    ids, pos: (n,) tokens and their positions. slots: an int (the n tokens' K/V go to slots
    [slots, slots + n) of kv) or an (n,) index tensor. layout: which of kv's columns each query
    sees (layout.py); the new tokens lie inside its columns, with no delta pending. shared:
    groups in another cache (shared contexts) whose encoded tokens every query sees besides
    (hydragen.py). The result sent back: None without logits_at; else, for the rows logits_at
    selects, logits (m, V), or their greedy tokens (m,) with argmax; allow (m, V) bool: with
    argmax, the tokens each of those rows may pick (token healing's), None for any. precision:
    of the linear layers (precision.py). kv16: attention reads the cache's fp16 copy (a decode
    step, pass_attention.py)."""
    kv: Any
    ids: torch.Tensor
    pos: torch.Tensor
    slots: int | torch.Tensor
    layout: Any
    logits_at: torch.Tensor | None = None
    argmax: bool = False
    precision: str = "fp32"
    shared: tuple = ()
    allow: torch.Tensor | None = None
    kv16: bool = False

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])


def run(model, passes: list[Pass | None]) -> list:
    """Each pass's result, from one forward per precision (None for a None: a stepper that
    waits this step out)."""
    groups: dict[str, list[int]] = {}
    for j, p in enumerate(passes):
        if p is not None:
            groups.setdefault(p.precision, []).append(j)
    out: list = [None] * len(passes)
    for idx in groups.values():
        for j, res in zip(idx, model.run([passes[j] for j in idx])):
            out[j] = res
    return out


def alone(model, stepper: Stepper):
    """Run a stepper by itself to its end; returns what it returns."""
    result = None
    while True:
        try:
            p = stepper.send(result)
        except StopIteration as done:
            return done.value
        result = None if p is None else model.run([p])[0]


def streaming(model, stepper: Stepper, pieces: list):
    """Run a stepper by itself, yielding what it appends to `pieces` as it goes (decode.decode's
    streamed text); returns what the stepper returns."""
    result = None
    while True:
        try:
            p = stepper.send(result)
        except StopIteration as done:
            yield from pieces
            pieces.clear()
            return done.value
        yield from pieces
        pieces.clear()
        result = None if p is None else model.run([p])[0]


@dataclass
class _Running:
    stepper: Stepper
    done: Callable[[Any, BaseException | None], None]
    pending: Pass | None = None
    fresh: bool = True  # its first pass has not run yet


class Scheduler:
    """Steppers that run together, one forward per step over all of their pending passes.

    add() a stepper between steps; step() runs one step. When a stepper ends, done(value, None)
    is called with what it returned, or done(None, error) with what it raised. Not
    thread-safe: the thread that drives the model calls everything here.

    first_passes_first: the first passes of steppers that joined since the last step (a
    completion's edit and prompt, the start of an encode) run in a step of their own, ahead of
    the others' next passes, which wait that one step: a new completion's first token then
    waits for the step under way and its own, not for the whole batch's decode step. Never two
    such steps in a row, so no stepper waits more than one step for another's."""

    def __init__(self, model, first_passes_first: bool = False):
        self.model, self.first_passes_first = model, first_passes_first
        self._ahead = False  # the last step ran first passes ahead of the others
        self.running: list[_Running] = []
        self.steps = 0
        self.passes = 0  # passes run so far, over all steps
        self.widest = 0  # the most passes one step has run
        self.ahead_steps = 0  # steps that ran first passes ahead of the others

    def __len__(self) -> int:
        return len(self.running)

    def add(self, stepper: Stepper, done: Callable[[Any, BaseException | None], None]) -> None:
        """Start a stepper: it runs until its first pass now, and joins the next step."""
        r = _Running(stepper, done)
        if self._advance(r, None):
            self.running.append(r)

    def step(self) -> int:
        """Run every pending pass, in one forward per precision, and advance each stepper
        to its next pass. Returns how many passes ran."""
        if not self.running:
            return 0
        batch, self.running = self.running, []
        fresh = [r for r in batch if r.fresh]
        self._ahead = self.first_passes_first and not self._ahead and 0 < len(fresh) < len(batch)
        if self._ahead:
            batch, self.running = fresh, [r for r in batch if not r.fresh]
        for r in batch:
            r.fresh = False
        ran = sum(r.pending is not None for r in batch)
        try:
            results = run(self.model, [r.pending for r in batch])
        except BaseException as e:  # the forward failed: every stepper in it hears why
            for r in batch:
                self._fail(r, e)
            raise
        for r, res in zip(batch, results):
            if self._advance(r, res):
                self.running.append(r)
        self.steps += 1
        self.ahead_steps += self._ahead
        self.passes += ran
        self.widest = max(self.widest, ran)
        return ran

    def cancel_all(self, error: BaseException) -> None:
        """End every stepper with this error (the server is closing)."""
        batch, self.running = self.running, []
        for r in batch:
            self._fail(r, error)

    def _fail(self, r: _Running, e: BaseException) -> None:
        try:
            r.stepper.close()
        except Exception:  # a stepper that cannot even close: the error it was given is what matters
            log.exception("a stepper failed to close")
        r.done(None, e)

    def _advance(self, r: _Running, result) -> bool:
        """Send result; True while the stepper has another pass pending."""
        try:
            r.pending = r.stepper.send(result)
            return True
        except StopIteration as end:
            r.done(end.value, None)
        except BaseException as e:  # its own failure: reported to its owner, the others go on
            r.done(None, e)
        return False
