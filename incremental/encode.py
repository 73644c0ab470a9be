"""Encoding: the forward passes that give a document's dirty tokens their K/V.

An edit only marks tokens dirty (Region.splice); `settling` encodes them left to right, in chunks
of config.encode_chunk queries, and can stop between chunks, leaving the rest dirty. It is a
stepper (batch.py): each chunk is a Pass, so a server's scheduler runs chunks between (or
with) other documents' decode steps, and a long paste never holds the model for more than one. `refresh`
marks the stalest tokens dirty and settles them (pie-refresh's idle work); `recompute` does it for
any chosen tokens (blend.py's).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import layout
from .batch import Pass, Stepper
from .group import in_use


@dataclass
class Rider:
    """Queries that ride along with an encode's last forward pass: a completion's tail, so that
    an edit followed by a completion costs one pass of the weights, not two. `out` is set when
    it rode: what the pass gave for the last `rows` rows, their logits (rows, V) or, with
    argmax, their tokens (rows,)."""
    ids: np.ndarray            # (n,) the tail
    pos: np.ndarray            # (n,) its positions
    slot: int                  # its first scratch slot
    layout: layout.Layout      # its rows
    rows: int = 1              # how many of its last rows give an answer
    argmax: bool = False       # their greedy tokens instead (Pass.argmax), among those allowed
    allow: torch.Tensor | None = None
    out: torch.Tensor | None = None


def settling(doc, T: int, should_stop: Callable[[], bool] | None,
             chunk: Callable[[int, float | None], None], rider: Rider | None = None) -> Stepper:
    """A stepper that encodes doc's dirty tokens before index T. chunk(k, ms_per_token) is
    called after each chunk of k tokens (ms_per_token None for chunks too small to say; in a
    batch it includes the other passes'). Returns False when should_stop() interrupted it; the
    rest stays dirty for later. A rider joins the last chunk (not under a lazy layout, whose
    columns an encode may move)."""
    r, size = doc.region, doc.config.encode_chunk
    shared = layout.apart(doc)  # fixed for the whole encode, and kept from the budget meanwhile
    # several chunks read the columns before them again: they keep a bf16 copy (KVCache.mirrored)
    many = np.count_nonzero(r.dirty_tokens()[:T]) > size
    with in_use(doc, *shared), (doc.kv.mirrored() if many else contextlib.nullcontext()):
        at = r.slots(np.arange(T))                                       # (T,) token -> slot
        while True:
            dirty = np.flatnonzero(r.dirty_tokens()[:T])
            if not len(dirty):
                return True
            if should_stop is not None and should_stop():
                return False
            idx = dirty[:size]
            last = int(idx[-1])
            # a token encoded after a stale one is stale too: it attended to stale K/V
            own = r.stale_tokens()[: last + 1] & ~r.dirty_tokens()[: last + 1]
            others = any(g.has_stale() for g in doc.sees)
            any_before = np.concatenate([[others], others | np.logical_or.accumulate(own)[:-1]])
            slots = at[idx]
            pos = doc.position_of(idx)
            r.writing(idx, pos)
            lay = layout.encoding(doc, idx, slots)
            ids = doc.state.ids[idx]
            rides = rider is not None and len(dirty) <= size and r.order is None
            if rides:  # the tail after the chunk, in the same pass
                n = len(rider.ids)
                lay = layout.stack(lay, rider.layout)
                ids, pos = np.concatenate([ids, rider.ids]), np.concatenate([pos, rider.pos])
                slots = np.concatenate([slots, rider.slot + np.arange(n)])
            contiguous = bool((np.diff(slots) == 1).all())
            t0 = time.perf_counter()
            out = yield Pass(doc.kv, torch.from_numpy(ids), torch.from_numpy(pos),
                             int(slots[0]) if contiguous else torch.from_numpy(slots), lay,
                             logits_at=torch.arange(len(ids) - rider.rows, len(ids)) if rides else None,
                             argmax=rides and rider.argmax, allow=rider.allow if rides else None,
                             precision=doc.config.precision, shared=shared)
            if rides:
                rider.out = out
            ms = (time.perf_counter() - t0) * 1e3 / len(idx) if len(idx) >= 32 and not rides else None
            r.written(idx, any_before[idx])
            chunk(len(idx), ms)


def recompute(doc, idx: np.ndarray, should_stop: Callable[[], bool] | None = None) -> int:
    """Re-encode tokens idx (and anything dirty before them). Returns how many tokens were
    encoded; when interrupted, those not reached keep their K/V."""
    if not len(idx):
        return 0
    marked = doc.region.mark_dirty(idx)
    before = doc.stats["tokens_encoded_total"]
    if not doc.settle(should_stop, upto=int(idx[-1]) + 1):
        doc.region.unmark_dirty(marked)
    return doc.stats["tokens_encoded_total"] - before


def refresh(doc, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Re-encode the stalest region (from the first stale token on), up to max_tokens.
    Returns how many tokens were re-encoded."""
    r = doc.region
    stale = np.flatnonzero(r.stale_tokens())
    if not len(stale):
        return 0
    a = int(stale[0])
    b = doc.n if max_tokens is None else min(doc.n, a + max_tokens)
    # interrupted, what it did not reach keeps its K/V, stale but whole, rather than leave
    # encoding work on the next completion's path
    return recompute(doc, np.arange(a, b), should_stop)
