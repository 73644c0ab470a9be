"""Attention layouts: which cache columns each query of one forward pass attends to.

Every forward pass gets a Layout, and every Layout is built here: for encoding a chunk of a
document's tokens (`encoding`), and for a completion's tail and decode steps (`Completion`). A
query sees the encoded tokens of the groups its document attends to (`doc.sees`; a group's
dirty tokens hold no K/V yet), its own document as its prompt layout says (prompt.py, fim.py),
and itself. The Layout also carries each column's pending delta and position, which attention
over a lazy layout needs (attention.py).
"""
from __future__ import annotations

import numpy as np
import torch


class Layout:
    """mask (n, n_keys) bool, or None for every column; columns (delta, pos) as KVCache.columns
    gives them for at least n_keys columns (read from the cache when None)."""

    def __init__(self, kv, mask: torch.Tensor | None, n_keys: int | None = None, columns=None):
        assert mask is not None or n_keys is not None
        self.mask = mask
        self.n_keys = mask.shape[1] if n_keys is None else n_keys
        delta, pos = kv.columns(self.n_keys) if columns is None else columns
        self.delta, self.pos = delta[: self.n_keys], pos[: self.n_keys]


def stack(a: Layout, b: Layout) -> Layout:
    """One forward pass for the queries of a, then those of b (an encode and a completion's
    tail): masks side by side over the wider one's columns."""
    n = max(a.n_keys, b.n_keys)
    wide = a if a.n_keys >= b.n_keys else b
    mask = torch.zeros(a.mask.shape[0] + b.mask.shape[0], n, dtype=torch.bool)
    mask[: a.mask.shape[0], : a.n_keys] = a.mask
    mask[a.mask.shape[0]:, : b.n_keys] = b.mask
    out = Layout.__new__(Layout)
    out.mask, out.n_keys, out.delta, out.pos = mask, n, wide.delta, wide.pos
    return out


def context(doc, width: int) -> torch.Tensor:
    """(width,) bool: the encoded tokens of the groups doc attends to besides itself, in its
    own cache (the others are apart)."""
    vis = torch.zeros(width, dtype=torch.bool)
    for g in beside(doc, doc.sees):
        slots, encoded = g.encoded()
        vis[slots] = torch.from_numpy(encoded)
    return vis


def beside(doc, groups) -> list:
    """Those of the groups whose K/V live in doc's own cache."""
    return [g for g in groups if g.kv is doc.kv]


def apart(doc) -> tuple:
    """The groups doc sees that live in another cache (a server's shared contexts): a pass
    attends to them apart from its layout (Pass.shared, hydragen.py)."""
    return tuple(g for g in doc.sees if g.kv is not doc.kv)


def keys_end(groups) -> int:
    """One past the last slot of any of these groups."""
    return max([g.end for g in groups], default=0)


def encoding(doc, idx: np.ndarray, slots: np.ndarray) -> Layout:
    """Encoding doc's tokens idx (ascending token indices) into `slots`: each sees the groups
    doc attends to, doc's tokens up to itself, and what the prompt layout adds (FIM: the suffix
    sees its marker)."""
    r = doc.region
    last = int(idx[-1])
    extra = [(rows, g) for rows, g in doc.prompt.also_sees(doc, idx) if rows.any()]
    own_end = r.slot0 + last + 1 if r.order is None else r.end
    n_keys = max(own_end, keys_end(beside(doc, list(doc.sees) + [g for _, g in extra])))
    if r.order is None:
        cols = torch.arange(n_keys)
        mine = (cols[None, :] >= r.slot0) & (cols[None, :] <= torch.from_numpy(slots)[:, None])
    else:  # a lazy layout: slot order is not token order, so go by each slot's token
        tok = np.full(n_keys, -1, dtype=np.int64)
        tok[r.slot0: r.end] = r.token_of_slot()
        tok = torch.from_numpy(tok)
        mine = (tok[None, :] >= 0) & (tok[None, :] <= torch.from_numpy(idx)[:, None])
    mask = context(doc, n_keys)[None, :] | mine
    for rows, g in extra:
        mask[torch.from_numpy(rows), g.slot0: g.slot0 + g.n] = True
    return Layout(doc.kv, mask)


class Completion:
    """The layout of one completion: its context columns (fixed for the whole decode), the tail
    after them at scratch slots S.. (causal among themselves), then each candidate's own
    generated tokens, interleaved by step: token t of candidate c sits at S + n_tail + t*k + c."""

    def __init__(self, doc, cursor, need: int):
        self.S = doc.region.scratch(need)          # the target group's slots
        self.n_tail = len(cursor.tail)
        self.others = keys_end(beside(doc, list(doc.sees) + doc.prompt.decode_groups()))
        width = max(self.S + need, self.others)
        self.visible = context(doc, width)         # the groups before this document ...
        doc.prompt.visible(doc, self.visible, cursor)  # ... and its own tokens the completion reads
        self.visible[self.S: self.S + self.n_tail] = True
        self.kv, self.columns = doc.kv, doc.kv.columns(width)

    def tail(self, draft: int = 0) -> Layout:
        """The tail's rows, causal; with `draft` more rows after it in the first decode step's
        slots (decode.py's healing draft), which see what that step's token would see."""
        S, n = self.S, self.n_tail + draft
        n_keys = max(S + n, self.others)
        mask = self.visible[:n_keys].repeat(n, 1)                      # (n, n_keys)
        mask[:, S: S + n] = torch.ones(n, n, dtype=torch.bool).tril()
        return Layout(self.kv, mask, columns=self.columns)

    def first_slot(self, step: int, k: int) -> int:
        return self.S + self.n_tail + step * k

    def step(self, step: int, active: list[int], k: int) -> Layout:
        """Decode step `step` of the active candidates (of k): each sees the context, the tail
        and its own tokens so far."""
        n_keys = max(self.first_slot(step, k) + k, self.others)
        m = self.visible[:n_keys].repeat(len(active), 1)               # (a, n_keys)
        own = self.S + self.n_tail + torch.arange(step + 1)[None, :] * k + torch.tensor(active)[:, None]
        m.scatter_(1, own, True)
        return Layout(self.kv, m, columns=self.columns)
