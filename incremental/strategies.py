"""Update policies: after an edit, which cached tokens are kept (and moved) and which are encoded.

Every strategy answers with a Plan over the new token sequence, and one executor (the document's
Region: splice, or splice_lazy) carries it out, so their costs and their quality are compared on
the same code path:

- full:      re-encode everything. The exact reference.
- prefix:    keep the longest common token prefix, re-encode the rest (vLLM / SGLang prefix caching).
- reuse:     llama.cpp server's --cache-reuse: after the common prefix, greedily find chunks of at
             least N cached tokens that re-appear, shift them into place; it only ever skips cache
             tokens, so an insertion ends reuse. Re-encode everything else.
- conflict:  splice the new tokens in, leave moved keys at their old positions (PIE's negative baseline).
- pie:       encode only the new tokens and rotate every moved key by its delta.
- pie-window / pie-refresh: pie, plus re-encoding the W kept tokens after each change
             (pie-refresh also refreshes stale regions when idle, see Document.refresh).
- pie-blend: pie, plus recomputing a budget of chosen stale tokens after each edit and before
             each completion (blend.py).
- lazy:      pie's plan, but moved keys are not rotated: attention rotates queries instead
             (attention.py), so an edit's K/V work does not grow with the suffix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    keep: np.ndarray   # (T_new,) the old slot each new token keeps, or -1 where it is (re-)encoded
    rotate: bool       # rotate kept keys to their new positions


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    neq = np.flatnonzero(a[:n] != b[:n])
    return int(neq[0]) if len(neq) else n


def reuse_chunks(cache: np.ndarray, prompt: np.ndarray, n_past: int, min_chunk: int) -> list[tuple[int, int, int]]:
    """llama.cpp's cache-reuse scan: (cache_start, prompt_start, n) chunks shifted into place."""
    chunks = []
    head_c = head_p = n_past
    while head_c < len(cache) and head_p < len(prompt):
        n = 0
        while head_c + n < len(cache) and head_p + n < len(prompt) and cache[head_c + n] == prompt[head_p + n]:
            n += 1
        if n >= min_chunk:
            chunks.append((head_c, head_p, n))
            head_c += n
            head_p += n
        else:
            head_c += 1
    return chunks


def change_points(keep: np.ndarray) -> np.ndarray:
    """Where the text before a token changed: the start of each run of new tokens, and each kept
    token whose predecessor was removed."""
    T = len(keep)
    prev = np.concatenate([[-1], keep[:-1]])
    new = keep < 0
    run_start = new & ~np.concatenate([[False], new[:-1]])
    removed_before = ~new & (keep != prev + 1) & ((prev >= 0) | (np.arange(T) == 0))
    return np.flatnonzero(run_start | removed_before)


def check(strategy) -> str:
    """strategy, or ValueError naming the choices."""
    from .config import STRATEGIES
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy


def plan(strategy: str, old_ids: np.ndarray, new_ids: np.ndarray, origin: np.ndarray,
         reuse_min_chunk: int = 64, window: int = 0) -> Plan:
    """The plan of `strategy` for the edit old_ids -> new_ids; origin[i] is the old index of new
    token i when the token mirror kept it, else -1."""
    T = len(new_ids)
    keep = np.full(T, -1, dtype=np.int64)
    if strategy == "full":
        return Plan(keep, rotate=False)
    if strategy in ("prefix", "reuse"):
        lcp = common_prefix(old_ids, new_ids)
        keep[:lcp] = np.arange(lcp)
        if strategy == "reuse":
            for c, p, n in reuse_chunks(old_ids, new_ids, lcp, reuse_min_chunk):
                keep[p: p + n] = np.arange(c, c + n)
        return Plan(keep, rotate=True)
    if strategy == "conflict":
        return Plan(origin.copy(), rotate=False)
    if strategy in ("pie", "pie-window", "pie-refresh", "pie-blend", "lazy"):
        keep = origin.copy()
        if strategy in ("pie-window", "pie-refresh") and window > 0:
            for c in change_points(origin):
                # the first `window` kept tokens from c on are re-encoded: they are the stalest
                kept_after = np.flatnonzero(keep[c:] >= 0)[:window] + c
                keep[kept_after] = -1
        return Plan(keep, rotate=True)
    raise ValueError(f"unknown strategy {strategy!r}")
