"""Stale-KV repair: which stale tokens to recompute, within a budget (strategy pie-blend, and the
order of pie-refresh's idle work).

After pie's splice every kept token after an edit is stale: its K/V never saw the new text.
pie-blend recomputes some of them on the edit's critical path, in the same forward pass as the
new tokens (they are marked dirty, and Document.settle encodes them with a full encode's causal
mask), and, at each completion, the stale ones among the blend_cursor tokens before the cursor. Which
ones after the edit, by `blend_rule`:

    window     the first stale tokens after each change of the edit, nearest first (pie-window's
               choice, at this budget, shared among a rename's many places)
    age        those whose K/V are oldest: staleness compounds over edits, and these missed most
    structure  those that hold the edit's identifiers, nearest first, then the window
    deviation  CacheBlend's test: a pool of up to four times the budget (window and age) run
               again through layer 0; the largest layer-1 K/V deviations from the cache win, or,
               with blend_layers L, the pool narrows layer by layer to the budget at layer L
    a+b        half the budget each

The budget is blend_ratio of the stale tail, at most blend_cap tokens. A token recomputed since
the last edit is not picked again until the next one (Region.ages), though it may stay stale:
it attended to stale tokens before it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import layout
from .strategies import change_points



def budget(doc) -> int:
    """blend_ratio of the stale tokens, at most blend_cap."""
    cfg = doc.config
    return min(cfg.blend_cap, math.ceil(cfg.blend_ratio * int(doc.stale.sum())))


def candidates(doc) -> np.ndarray:
    """Stale tokens whose K/V are older than the last edit, in token order."""
    return np.flatnonzero(doc.region.stale_tokens() & (doc.region.ages() > 0))


def select(doc, keep: np.ndarray, rule: str, n: int) -> np.ndarray:
    """Up to n token indices to recompute after the edit whose plan kept `keep`, by rule. Only
    stale tokens: each is after some edit (a token before every edit is exact), though not
    always after this one: staleness compounds, and the oldest is often above it."""
    ch = change_points(keep)
    first = int(ch[0]) if len(ch) else 0
    cand = candidates(doc)
    if n <= 0 or not len(cand):
        return cand[:0]
    parts = rule.split("+")
    out = np.zeros(0, dtype=np.int64)
    for i, part in enumerate(parts):
        want = n // len(parts) + (i < n % len(parts))
        rest = np.setdiff1d(cand, out, assume_unique=True)
        out = np.union1d(out, PICK[part](doc, rest, keep, first, want))
    return out


def _window(doc, cand, keep, first, n):
    """The stale tokens nearest after a change of the edit: an editor's rename changes many
    places in one batch, and each needs the tokens right after it (pie-window re-encodes a
    window after every change). Without changes (idle work), the first after `first`."""
    ch = change_points(keep)
    if not len(ch):
        return cand[cand >= first][:n]
    last = np.searchsorted(ch, cand, side="right") - 1    # the change at or before each candidate
    c = cand[last >= 0]
    d = c - ch[last[last >= 0]]                           # tokens since that change
    return np.sort(c[np.lexsort((c, d))[:n]])


def _age(doc, cand, keep, first, n):
    ages = doc.region.ages()[cand]
    return cand[np.lexsort((cand, -ages))[:n]]  # oldest first, then earliest


def _structure(doc, cand, keep, first, n):
    """Tokens that hold an identifier the edit typed (a renamed name, a new call), nearest after
    the edit first; the window fills the rest."""
    eng, ids = doc.engine, doc.state.ids
    typed = {int(t) for t in ids[keep < 0]}
    names = {t for t in typed if (s := eng.token_text(t).strip()).replace("_", "a").isalnum() and len(s) > 1}
    hit = cand[np.isin(ids[cand], list(names))] if names else cand[:0]
    hit = hit[np.argsort(np.abs(hit - first), kind="stable")][:n]
    return np.union1d(hit, _window(doc, np.setdiff1d(cand, hit), keep, first, n - len(hit)))


def _deviation(doc, cand, keep, first, n):
    """CacheBlend: a pool of candidates (the window's and the oldest) run again from layer 0,
    whose K/V there are exact (they depend on token and position only), and compared at layer
    1 with what the cache holds; with blend_layers L > 1 the pool narrows layer by layer, to n
    at layer L, each survivor run one layer deeper (against the cache as it is). The new tokens
    are encoded first, since the deviation is what they cause."""
    if n <= 0:
        return cand[:0]
    doc.prompt.settle(doc)
    pool = np.union1d(_window(doc, cand, keep, first, 2 * n), _age(doc, cand, keep, first, 2 * n))
    depth = doc.config.blend_layers
    if depth >= doc.engine.model.n_layers:
        raise ValueError(f"blend_layers {depth} leaves no layer to compare: this model has "
                         f"{doc.engine.model.n_layers}; use at most {doc.engine.model.n_layers - 1}")
    for layer in range(1, depth + 1):
        want = n if layer == depth else max(n, round(n * (len(pool) / n) ** ((depth - layer) / depth)))
        if len(pool) > want:
            pool = np.sort(pool[np.argsort(-_deviation_at(doc, pool, layer), kind="stable")[:want]])
    return pool


def _deviation_at(doc, pool: np.ndarray, layer: int) -> np.ndarray:
    """(len(pool),) relative K plus V deviation at `layer` of the pool's recomputed K/V from the
    cache's, averaged over heads."""
    r, model = doc.region, doc.engine.model
    slots = r.slots(pool)
    k, v = model.forward(doc.kv, torch.from_numpy(doc.state.ids[pool]), torch.from_numpy(doc.positions[pool]),
                         torch.from_numpy(slots), layout.encoding(doc, pool, slots), probe=layer,
                         precision=doc.config.precision, shared=layout.apart(doc))
    at = torch.from_numpy(slots).to(k.device)
    kc, vc = doc.kv.k[layer, :, at][None], doc.kv.v[layer, :, at][None]     # (1, Hkv, m, D)
    dev = ((k - kc).norm(dim=-1) / (kc.norm(dim=-1) + 1e-6) + (v - vc).norm(dim=-1) / (vc.norm(dim=-1) + 1e-6))
    return dev[0].mean(0).cpu().numpy()


PICK = {"window": _window, "age": _age, "structure": _structure, "deviation": _deviation}


def repair_edit(doc, keep: np.ndarray) -> int:
    """pie-blend, right after an edit's splice: mark the chosen stale tokens for encoding with
    the new ones. Returns how many."""
    idx = select(doc, keep, doc.config.blend_rule, budget(doc))
    doc.region.mark_dirty(idx)
    return len(idx)


def repair_cursor(doc, j: int) -> int:
    """pie-blend, before a completion that reads tokens [0, j): mark the stale ones among the
    last blend_cursor of them for encoding. Returns how many."""
    cand = candidates(doc)
    idx = cand[(cand < j) & (cand >= j - doc.config.blend_cursor)]
    doc.region.mark_dirty(idx)
    return len(idx)


def ranked(doc, n: int) -> np.ndarray:
    """For idle work: the n stale tokens the rule ranks highest (as if n were the budget). Where
    the rule runs short (the window after the last edit holds fewer than n, while older edits
    left stale tokens above it), the oldest of the rest fill it: idle time is never left unused
    while a stale token waits."""
    picked = select(doc, np.zeros(0, dtype=np.int64) if doc.last_keep is None else doc.last_keep,
                    doc.config.blend_rule.replace("deviation", "age"), n)
    rest = np.setdiff1d(candidates(doc), picked, assume_unique=True)
    return np.union1d(picked, _age(doc, rest, None, 0, n - len(picked)))
