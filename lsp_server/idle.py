"""Idle work in slices: encoding dirty tokens, and pie-refresh's re-encoding of stale ones.

Document.settle checks should_stop only between encode_chunk-sized passes (half a second of CPU
at 512 tokens), so the idle job hands it slices of about maxPromptMs instead: the next keystroke
or request waits for one slice at most.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

IDLE_SLICE_MS = 100  # background encoding per slice when maxPromptMs is 0 (no cap)
MIN_SLICE = 64       # fewer tokens per forward pass cost much more per token on a CPU


def slice_tokens(doc) -> int:
    cfg = doc.engine.config
    per_slice = (cfg.max_prompt_ms or IDLE_SLICE_MS) / max(doc.encode_ms_per_token, 1e-3)
    return int(min(cfg.encode_chunk, max(MIN_SLICE, per_slice)))


def settle_slices(doc, should_stop: Callable[[], bool], encoded: Callable[[int], None]) -> bool:
    """Encode doc's dirty tokens slice by slice, calling encoded(n) after each. False when stopped."""
    while True:
        dirty = np.flatnonzero(doc.dirty)
        if not len(dirty):
            return True
        if should_stop():
            return False
        k = min(len(dirty), slice_tokens(doc))
        before = doc.stats["tokens_encoded_total"]
        doc.settle(should_stop, upto=int(dirty[k - 1]) + 1)
        encoded(doc.stats["tokens_encoded_total"] - before)


def refresh_slices(doc, should_stop: Callable[[], bool], refreshed: Callable[[int], None]) -> bool:
    """pie-refresh while idle: re-encode doc's stale tokens slice by slice, calling refreshed(n)
    after each: first those the blend rule ranks highest (blend.ranked), then from the first stale
    token on, which also fixes what the first pass encoded before its predecessors were fresh.
    False when stopped (the tokens of an unfinished slice keep their stale K/V: nothing is left
    for a completion to encode)."""
    if doc.strategy != "pie-refresh":
        return True
    while True:
        if should_stop():
            return False
        n = doc.refresh(max_tokens=slice_tokens(doc), should_stop=should_stop, ranked=True)
        if not n:
            break
        refreshed(n)
    first = -1
    while True:
        stale = np.flatnonzero(doc.stale)
        # no progress: a group it attends to is stale itself, and re-encoding cannot fix that
        if not len(stale) or stale[0] <= first:
            return True
        if should_stop():
            return False
        first = int(stale[0])
        refreshed(doc.refresh(max_tokens=slice_tokens(doc), should_stop=should_stop))


def encode_idle(docs, uri: str | None, should_stop: Callable[[], bool], encoded: Callable[[int], None],
                refreshed: Callable[[int], None]) -> None:
    """The idle job's encoding: dirty tokens (uri's first, see docs.to_encode), then, once all
    are encoded, pie-refresh's stale ones; each document seen through docs.view."""
    for doc in docs.to_encode(uri, should_stop):
        with docs.view(doc):
            if not settle_slices(doc, should_stop, encoded):
                return
    # the groups others attend to first: an active document is fresh only after its contexts
    for doc in sorted(docs.documents(), key=lambda d: len(d.sees)):
        with docs.view(doc):
            if not refresh_slices(doc, should_stop, refreshed):
                return
