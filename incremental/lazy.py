"""Lazy deltas: an edit that moves keys records how far they moved instead of rotating them.

RoPE scores depend only on the distance between a query and a key: a key rotated to position p
that belongs at p + d scores against a query at m exactly as the true key would against a query
at m - d. So `lazy` leaves moved keys where they are, in memory and in rotation, and remembers d
per slot (KVCache.delta); attention rotates each query once per distinct pending delta
(attention_with_deltas). New tokens go to fresh slots after the region's used ones, and deleted
tokens' slots become holes, so a document's token i lives at slot slot0 + order[i]: an edit
costs O(edited tokens) in K/V work; what stays O(file) is integer bookkeeping (microseconds).

Compaction rotates every pending key for real and puts the slots back in token order. It runs
when the pending deltas split the document into more than `lazy_segments` runs (each run costs
attention one more matmul per layer), or when holes outnumber half the tokens.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from livekv import kernels

from .strategies import Plan, change_points

MAX_SCORES = 1 << 25  # score elements per query block: bounds the memory of one attention call
# From this many queries on, scoring per run loses to rotating a copy of the keys and running SDPA
# (measured on this CPU: 5.2 vs 5.6 ms a layer at 32 queries x 4k keys, 199 vs 634 at 512 x 16k).
LAZY_MAX_QUERIES = 32
# A document about to encode this many tokens (a paste) compacts first (update.settle): that
# rotation is paid once, not by every layer of every pass.
LAZY_COMPACT_TOKENS = 128
MIN_SKIP = 256  # key columns nobody sees, in a stretch at least this long, are not read at all
# With nothing pending, skipping unseen columns pays for leaving SDPA only from about this many
# (SDPA: 0.09 ms a layer at 1k keys, per-run scoring 0.16; at 16k keys 3.1 against 1.8).
SKIP_ALONE = 2048


def live_slots(doc) -> np.ndarray:
    """(used,) bool over the document's region: which slots hold one of its tokens."""
    live = np.zeros(doc.used, dtype=bool)
    live[doc.order if doc.order is not None else slice(0, doc.n)] = True
    return live


def segments(doc) -> int:
    """Runs of equal pending delta among the document's live slots, in slot order."""
    if doc.n == 0:
        return 0
    s0 = doc.slot0
    d = doc.kv.delta[s0: s0 + doc.used][live_slots(doc)]
    return 1 + int(np.count_nonzero(np.diff(d)))


def rearrange_lazy(doc, p: Plan) -> int:
    """Carry out a pie plan without touching kept K/V: kept tokens keep their slots and get a
    pending delta, new tokens get fresh slots. Returns keys rotated (0 unless it compacted)."""
    kv, keep = doc.kv, p.keep
    doc.last_keep = keep
    T = len(keep)
    new_idx = np.flatnonzero(keep >= 0)
    enc_idx = np.flatnonzero(keep < 0)
    old_order = doc.order if doc.order is not None else np.arange(doc.n, dtype=np.int64)
    kv.grow(doc, doc.used + len(enc_idx) + 16)
    s0 = doc.slot0
    order = np.empty(T, dtype=np.int64)
    order[new_idx] = old_order[keep[new_idx]]
    order[enc_idx] = doc.used + np.arange(len(enc_idx))
    doc.order, doc.n, doc.used = order, T, doc.used + len(enc_idx)
    kept, fresh = s0 + order[new_idx], s0 + order[enc_idx]
    changes = change_points(keep)
    if len(changes):  # kept tokens after a change never saw it
        kv.stale[kept[new_idx >= changes[0]]] = True
    kv.stale[fresh], kv.dirty[fresh] = False, True
    kv.pos[fresh], kv.delta[fresh] = doc.position_of(enc_idx), 0
    kv.delta[kept] = doc.position_of(new_idx) - kv.pos[kept]
    holes = doc.used - doc.n
    if segments(doc) > doc.engine.config.lazy_segments or holes > doc.n // 2 + 256:
        return compact(doc)
    return 0


def compact(doc) -> int:
    """Rotate every pending key for real and put the region back in token order. O(tokens
    after the first one out of place). Returns the keys rotated."""
    if doc.order is None:
        return 0
    kv, s0, n, order = doc.kv, doc.slot0, doc.n, doc.order
    src = s0 + order                                            # (n,) where token i's K/V sit now
    delta = kv.delta[src]
    moved = (order != np.arange(n)) | (delta != 0)
    f = int(np.argmax(moved)) if moved.any() else n             # tokens before f are in place
    src, delta = src[f:], delta[f:]
    rotated = int(np.count_nonzero(delta))
    if f < n:
        dev = kv.k.device
        src_t = torch.from_numpy(src).to(dev)
        delta_t, pos_t = torch.from_numpy(delta).to(dev), torch.from_numpy(kv.pos[src].copy()).to(dev)
        inv_freq = doc.engine.model.inv_freq.to(dev)
        for i in range(kv.k.shape[0]):  # one layer at a time: the gathered copy stays small
            k = kv.k[i].index_select(1, src_t)[None]            # (1, Hkv, n - f, D)
            if rotated:
                kernels.rerotate_keys_(k, delta_t, inv_freq, positions=pos_t)
            kv.k[i, :, s0 + f: s0 + n] = k[0]
            kv.v[i, :, s0 + f: s0 + n] = kv.v[i].index_select(1, src_t)
        pos, stale, dirty = kv.pos[src] + delta, kv.stale[src], kv.dirty[src]
        s = slice(s0 + f, s0 + n)
        kv.pos[s], kv.stale[s], kv.dirty[s] = pos, stale, dirty
    kv.delta[s0: s0 + doc.used] = 0
    doc.order, doc.used = None, n
    doc._stats["compactions"] += 1
    return rotated


def delta_runs(delta: np.ndarray, seen: np.ndarray, min_skip: int = MIN_SKIP) -> list[tuple[int, int, int]]:
    """(a, b, d) runs of key columns with equal pending delta.

    Columns no query sees are left out when they form a stretch of min_skip or more (a new
    token near the top of a file does not read the rest of it); shorter stretches (holes,
    dirty tokens) join their left neighbour's run, so they do not split it."""
    N = len(delta)
    d = delta[np.maximum.accumulate(np.where(seen, np.arange(N), 0))]
    edges = np.flatnonzero(np.diff(np.concatenate([[1], seen.astype(np.int8), [1]])))
    starts, ends = edges[0::2], edges[1::2]                     # unseen stretches [start, end)
    short = ends - starts < min_skip
    fill = np.zeros(N + 1, dtype=np.int64)
    np.add.at(fill, starts[short], 1)
    np.add.at(fill, ends[short], -1)
    keep = seen | (np.cumsum(fill)[:N] > 0)
    brk = np.flatnonzero((np.diff(d) != 0) | (np.diff(keep) != 0)) + 1
    bounds = zip(np.concatenate([[0], brk]), np.concatenate([brk, [N]]))
    return [(int(a), int(b), int(d[a])) for a, b in bounds if keep[a]]


class PendingDeltas:
    """How one forward pass attends to keys with pending deltas: `runs` over the columns some
    query sees, scored per run (attention_with_deltas), or, for many queries (`copy`), against
    a copy of those columns rotated for real, then SDPA. runs is None (plain SDPA over every
    column) when no seen key is pending and few columns are hidden from every query; when many
    are (a completion's hidden suffix, the tail of a lazy layout), runs skip them all the same."""

    def __init__(self, kv, n_keys: int, mask, many_queries: bool, inv_freq):
        self.runs = self.cols = None
        self.copy = False
        if mask is None and not kv.delta[:n_keys].any():
            return
        seen = np.ones(n_keys, dtype=bool) if mask is None else mask.any(0).cpu().numpy()
        delta = kv.delta[:n_keys]
        if not delta[seen].any() and n_keys - np.count_nonzero(seen) < max(SKIP_ALONE, n_keys // 4):
            return
        self.runs = delta_runs(delta, seen)
        dev = inv_freq.device
        cols = np.concatenate([np.arange(a, b) for a, b, _ in self.runs])
        self.cols = torch.from_numpy(cols).to(dev)
        self.copy = many_queries
        if self.copy:
            self.delta = torch.from_numpy(np.concatenate([np.full(b - a, d) for a, b, d in self.runs])).to(dev)
            self.pos, self.inv_freq = torch.from_numpy(kv.pos[cols]).to(dev), inv_freq

    def rotated(self, K, V):
        """K and V (1, Hkv, N, D) as the copy path attends to them (as they are without runs)."""
        if self.runs is None:
            return K, V
        K = torch.cat([K[:, :, a:b] for a, b, _ in self.runs], 2)
        kernels.rerotate_keys_(K, self.delta, self.inv_freq, positions=self.pos)
        return K, torch.cat([V[:, :, a:b] for a, b, _ in self.runs], 2)


def attention_with_deltas(q_raw, K, V, rope, runs, attn_mask, scaling: float):
    """Attention where the keys of each run (a, b, d) belong d positions later than rotated;
    key columns outside every run are not attended.

    q_raw: (1, H, n, D) queries before RoPE; rope(q, d) rotates them to their positions minus d.
    K, V: (1, Hkv, N, D). attn_mask: (n, M) additive over the runs' columns, in run order, or
    None. Returns (1, H, n, D)."""
    _, H, n, D = q_raw.shape
    Hkv = K.shape[1]
    rep = H // Hkv                                              # query heads per kv head (GQA)
    M = sum(b - a for a, b, _ in runs)
    qd = {d: rope(q_raw, d).view(1, Hkv, rep, n, D) for d in sorted({r[2] for r in runs})}
    out = torch.empty(1, Hkv, rep, n, D, dtype=q_raw.dtype, device=q_raw.device)
    block = max(1, MAX_SCORES // max(1, H * M))
    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        m = q1 - q0
        s = torch.empty(1, Hkv, rep * m, M, dtype=torch.float32, device=q_raw.device)
        at = 0
        for a, b, d in runs:
            q = qd[d][:, :, :, q0:q1].reshape(1, Hkv, rep * m, D)
            s[..., at: at + b - a] = torch.matmul(q, K[:, :, a:b].transpose(-1, -2)).float()
            at += b - a
        s = s.view(1, Hkv, rep, m, M).mul_(scaling)
        if attn_mask is not None:
            s += attn_mask[q0:q1].float()
        p = F.softmax(s, dim=-1).to(V.dtype).view(1, Hkv, rep * m, M)
        o, at = None, 0
        for a, b, _ in runs:
            part = torch.matmul(p[..., at: at + b - a], V[:, :, a:b])   # (1, Hkv, rep * m, D)
            o = part if o is None else o.add_(part)
            at += b - a
        out[:, :, :, q0:q1] = o.view(1, Hkv, rep, m, D)
    return out.view(1, H, n, D)
