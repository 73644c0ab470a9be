"""Carrying out a Plan on a document's region of the cache: move, rotate, mark, encode.

One executor for every strategy (strategies.py only decides what is kept), so their costs are
measured on the same code path. Encoding is lazy: `rearrange` marks tokens dirty, `settle`
encodes dirty tokens left to right in chunks and can stop between chunks, leaving the rest dirty.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from livekv import kernels

from .lazy import LAZY_COMPACT_TOKENS, compact, rearrange_lazy
from .strategies import Plan, change_points


def rearrange(doc, p: Plan) -> int:
    """Move kept K/V to their new slots, rotate them, mark the rest dirty. Returns keys rotated."""
    if doc.strategy == "lazy" and doc.fim is None and doc.gap is None:
        return rearrange_lazy(doc, p)
    rotated = compact(doc)  # a fork of a lazy document: token order first
    kv, keep, s0 = doc.kv, p.keep, doc.slot0
    doc.last_keep = keep  # for tests and tools: which old index each token came from
    T = len(keep)
    new_idx = np.flatnonzero(keep >= 0)
    old_idx = keep[new_idx]
    if doc.gap is not None:  # the FIM suffix marker stays before the same old token
        old_gap = doc.gap
        k = int(np.searchsorted(old_idx, old_gap, side="left"))
        doc.gap = int(new_idx[k]) if k < len(new_idx) else T
        changes = change_points(keep)
        if doc.gap != old_gap or (len(changes) and changes[0] < doc.gap):
            doc.on_prefix_changed()
    kv.grow(doc, max(T, doc.n) + 16)
    s0 = doc.slot0
    # Runs of tokens that move together. Left-movers go first in ascending order, right-movers
    # last in descending order: then no move overwrites a source that is still to be read.
    if len(new_idx):
        shift = new_idx - old_idx
        brk = np.flatnonzero((np.diff(new_idx) != 1) | (np.diff(shift) != 0)) + 1
        runs = [(int(old_idx[a]), int(new_idx[a]), int(b - a))
                for a, b in zip(np.concatenate([[0], brk]), np.concatenate([brk, [len(new_idx)]]))]
        for src, dst, n in [r for r in runs if r[1] < r[0]]:
            kv.move(s0 + src, s0 + dst, n)
        for src, dst, n in sorted([r for r in runs if r[1] > r[0]], reverse=True):
            kv.move(s0 + src, s0 + dst, n)
    doc.n = doc.used = T
    enc_idx = np.flatnonzero(keep < 0)
    changes = change_points(keep)
    if len(changes):  # kept tokens after a change never saw it
        kv.stale[s0 + new_idx[new_idx >= changes[0]]] = True
    kv.stale[s0 + enc_idx] = False
    kv.dirty[s0 + enc_idx] = True
    if p.rotate and len(new_idx):
        delta = doc.position_of(new_idx) - kv.pos[s0 + new_idx]
        moved = new_idx[delta != 0]
        if len(moved):
            a, b = int(moved[0]), int(moved[-1]) + 1
            d = np.zeros(b - a, dtype=np.int64)
            d[moved - a] = delta[delta != 0]
            dev = kv.k.device
            # one call for every layer: the layer axis is the kernel's batch axis
            kernels.rerotate_keys_(kv.k[:, :, s0 + a: s0 + b], torch.from_numpy(d).to(dev),
                                   doc.engine.model.inv_freq.to(dev),
                                   positions=torch.from_numpy(kv.pos[s0 + a: s0 + b].copy()).to(dev))
            kv.pos[s0 + moved] = doc.position_of(moved)
            rotated += len(moved)
    kv.pos[s0 + enc_idx] = doc.position_of(enc_idx)
    return rotated


def visible_slots(doc, n_keys: int) -> torch.Tensor:
    """(n_keys,) bool: the slots of the groups doc attends to besides itself. A group's tokens
    that are not encoded yet (dirty) hold no K/V and are not attended."""
    vis = torch.zeros(n_keys, dtype=torch.bool)
    kv = doc.kv
    for g in doc.sees:
        s = g.index()
        vis[s] = torch.from_numpy(~kv.dirty[s])
    return vis


def keys_end(doc, after_gap: bool = False) -> int:
    """One past the last slot any of doc's queries may attend to, besides its own."""
    groups = list(doc.sees) + (list(doc.after_gap) if after_gap else [])
    return max([g.slot0 + g.used for g in groups], default=0)


def settle(doc, should_stop: Callable[[], bool] | None = None, upto: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> bool:
    """Encode doc's dirty tokens (those before index `upto`, default all) left to right, in chunks.

    progress(done, total) is called after each chunk. Returns False when should_stop()
    interrupted it; the rest stays dirty for later."""
    kv, model, chunk = doc.kv, doc.engine.model, doc.engine.config.encode_chunk
    s0 = doc.slot0
    T = doc.n if upto is None else min(upto, doc.n)
    total, encoded = int(kv.dirty[doc.span(T)].sum()), 0
    stats = doc._stats
    if doc.order is not None and total >= LAZY_COMPACT_TOKENS:
        # a paste under lazy: one real rotation now, then plain attention, beats per-run scoring
        rotated = compact(doc)
        stats["keys_rotated_last_edit"] += rotated
        stats["keys_rotated_total"] += rotated
    at = doc.index(np.arange(T))                                      # (T,) token -> slot
    while True:
        dirty = np.flatnonzero(kv.dirty[at])
        if not len(dirty):
            return True
        if should_stop is not None and should_stop():
            return False
        idx = dirty[:chunk]
        last = int(idx[-1])
        late_any = doc.gap is not None and bool(doc.after_gap) and last >= doc.gap
        own_end = s0 + last + 1 if doc.order is None else s0 + doc.used
        n_keys = max(own_end, keys_end(doc, after_gap=late_any))
        own = kv.stale[at[: last + 1]] & ~kv.dirty[at[: last + 1]]
        others = any(kv.stale[g.index()].any() for g in doc.sees)
        # a token encoded after a stale one is stale too: it attended to stale K/V
        any_before = np.concatenate([[others], others | np.logical_or.accumulate(own)[:-1]])
        slots = torch.from_numpy(at[idx])
        if doc.order is None:
            cols = torch.arange(n_keys)
            mine = (cols[None, :] >= s0) & (cols[None, :] <= slots[:, None])
        else:  # a lazy layout: slot order is not token order, so go by each slot's token
            tok = np.full(n_keys, -1, dtype=np.int64)
            tok[doc.index()] = np.arange(doc.n)
            tok = torch.from_numpy(tok)
            mine = (tok[None, :] >= 0) & (tok[None, :] <= torch.from_numpy(idx)[:, None])
        mask = visible_slots(doc, n_keys)[None, :] | mine
        if doc.gap is not None and doc.after_gap:  # FIM: the suffix comes after its marker
            late = torch.from_numpy(idx >= doc.gap)
            for g in doc.after_gap:
                mask[late, g.slot0: g.slot0 + g.n] = True
        contiguous = bool((np.diff(at[idx]) == 1).all())
        t0 = time.perf_counter()
        pos = doc.position_of(idx)
        model.forward(kv, torch.from_numpy(doc.state.ids[idx]), torch.from_numpy(pos),
                      int(slots[0]) if contiguous else slots, n_keys, mask)
        if len(idx) >= 32:  # small runs are dominated by reading the weights once
            per_token = (time.perf_counter() - t0) * 1e3 / len(idx)
            doc.encode_ms_per_token = 0.5 * doc.encode_ms_per_token + 0.5 * per_token
        kv.pos[at[idx]] = pos
        kv.stale[at[idx]] = any_before[idx]
        kv.dirty[at[idx]] = False
        stats["tokens_encoded_last_edit"] += len(idx)
        stats["tokens_encoded_total"] += len(idx)
        encoded += len(idx)
        if progress is not None:
            progress(encoded, total)


def refresh(doc, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Re-encode the stalest region (from the first stale token on), up to max_tokens.
    Returns how many tokens were re-encoded."""
    kv = doc.kv
    stale = np.flatnonzero(kv.stale[doc.index()])
    if not len(stale):
        return 0
    a = int(stale[0])
    b = doc.n if max_tokens is None else min(doc.n, a + max_tokens)
    at = doc.index(np.arange(a, b))
    marked = at[~kv.dirty[at]]
    kv.dirty[marked] = True
    before = doc._stats["tokens_encoded_total"]
    if not settle(doc, should_stop, upto=b):
        # interrupted: what it did not reach keeps its K/V, stale but whole, rather than leave
        # encoding work on the next completion's path
        kv.dirty[marked] = False
    return doc._stats["tokens_encoded_total"] - before
