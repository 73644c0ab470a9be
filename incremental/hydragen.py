"""Hydragen: attention over a shared context group once for every query in a batch that sees it.

Context groups that a server shares between connections (shared.py) live in a cache of their
own. A pass whose document sees such groups (Pass.shared) attends to each of them apart from its
own cache: softmax attention over disjoint sets of keys is recovered exactly from each set's
output and log-sum-exp (attention.merge). In a batch several passes (completions and edits of
different connections) often see the same group; its keys are then read once, against all of
their queries stacked into one matrix multiply (Hydragen, Juravsky et al. 2024: the shared
prefix attended with batched queries), not once per pass.

A group's keys are taken where they are when the forward runs, so a shared cache may move its
groups between steps. A shared group's keys carry no pending delta (shared groups are never
lazy), and every query of a pass sees every encoded token of the groups it shares. When every
row that sees a group is a decode step at reduced precision (PassAttention.fp16_decode), the
group is read from its cache's fp16 copy: half the bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from .attention import attend_lse


def group_keys(g, i: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Layer i's keys and values (1, Hkv, N, D) of group g's encoded tokens; None when none is.
    dtype: from its cache's copy in that dtype (KVCache.layer_as)."""
    slots, encoded = g.encoded()
    kv = g.kv
    if isinstance(slots, slice) and encoded.all():
        if slots.stop <= slots.start:
            return None
        K, V = kv.layer(i, slots.stop) if dtype is None else kv.layer_as(i, slots.stop, dtype)
        return K[:, :, slots.start:], V[:, :, slots.start:]
    cols = np.arange(slots.start, slots.stop)[encoded] if isinstance(slots, slice) else np.asarray(slots)[encoded]
    if not len(cols):
        return None
    idx = torch.from_numpy(cols).to(kv.k.device)
    K, V = kv.layer(i, int(cols.max()) + 1) if dtype is None else kv.layer_as(i, int(cols.max()) + 1, dtype)
    return K.index_select(2, idx), V.index_select(2, idx)


def shared_attention(i: int, rows: list, scaling: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layer i, after each pass attended to its own cache (PassAttention.attend, which leaves its
    rotated queries in .q): for each shared group any pass sees, (out (1, H, n, D), lse
    (1, H, n)) over every row of the batch, the group attended once for the rows of all the
    passes that see it (zeros and -inf on the other rows: they weigh nothing in a merge)."""
    users: dict[int, tuple] = {}
    for j, r in enumerate(rows):
        for g in r.p.shared:
            users.setdefault(id(g), (g, []))[1].append(j)
    if not users:
        return []
    sizes = [r.p.n for r in rows]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n, parts = int(starts[-1]), []
    for g, js in users.values():
        half = all(rows[j].fp16_decode for j in js)  # decode steps only: read the group's fp16 copy
        if half:
            g.kv.keep_mirror(torch.float16)
        kv = group_keys(g, i, torch.float16 if half else None)
        if kv is None:
            continue
        qs = [rows[j].q for j in js]
        q = torch.cat(qs, dim=2) if len(qs) > 1 else qs[0]            # (1, H, sum m, D)
        out, lse = attend_lse(q.to(kv[0].dtype), *kv, None, scaling)
        out = out.to(q.dtype)
        if len(js) < len(rows):  # to the batch's rows
            at = torch.from_numpy(np.concatenate([np.arange(starts[j], starts[j + 1]) for j in js])).to(q.device)
            full = out.new_zeros(1, out.shape[1], n, out.shape[3])
            full_lse = lse.new_full((1, lse.shape[1], n), float("-inf"))
            out, lse = full.index_copy_(2, at, out), full_lse.index_copy_(2, at, lse)
        parts.append((out, lse))
    return parts
