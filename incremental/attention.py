"""Attention over keys with pending deltas (lazy layouts), and over long stretches of unseen keys.

RoPE scores depend only on the distance between a query and a key: a key rotated to position p
that belongs at p + d scores against a query at m exactly as the true key would against a query
at m - d. So a lazy region leaves moved keys where they are and records d per slot (region.py);
attention rotates each query once per distinct pending delta and scores each run of equal delta
against its slice of keys (attention_with_deltas). With many queries it is cheaper to attend to
a rotated copy of those keys through SDPA instead (PendingDeltas.copy).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from livekv import kernels

FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp)
MAX_SCORES = 1 << 25  # score elements per query block: bounds the memory of one attention call
# From this many queries on, scoring per run loses to rotating a copy of the keys and running SDPA
# (measured on this CPU: 5.2 vs 5.6 ms a layer at 32 queries x 4k keys, 199 vs 634 at 512 x 16k).
LAZY_MAX_QUERIES = 32
# A document about to encode this many tokens (a paste) compacts first (Document.settle): that
# rotation is paid once, not by every layer of every pass.
LAZY_COMPACT_TOKENS = 128
FEW_QUERIES = 4  # up to this many queries (a decode step, its candidates) attend by plain matmuls
MIN_SKIP = 256  # key columns nobody sees, in a stretch at least this long, are not read at all
# With nothing pending, skipping unseen columns pays for leaving SDPA only from about this many
# (SDPA: 0.09 ms a layer at 1k keys, per-run scoring 0.16; at 16k keys 3.1 against 1.8).
SKIP_ALONE = 2048
# Many queries (the copy path) skip unseen columns when n * (H / Hkv) * skipped >= COPY_SKIP * kept:
# the scores the fused kernel would compute for nothing against copying the kept K/V once, a
# column's copy costing about as much as 28 scores on a CPU (README, "How it works")
COPY_SKIP = 28
# An encode chunk after this many columns it all sees attends to them apart (attend's causal_tail):
# below, the merge costs more than the mask it saves (an open at 1k tokens: 3-4% slower; at 4k,
# 3.5% faster with it)
CAUSAL_TAIL_MIN = 1024


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
    """How one forward pass attends, given its Layout: `runs` over the columns some query sees,
    scored per run (attention_with_deltas), or, for many queries (`copy`), against a copy of
    those columns rotated for real, then SDPA. runs is None (plain SDPA over every column) when
    no seen key is pending and few columns are hidden from every query (for many queries: too
    few to pay for the copy, COPY_SKIP); when many are (a completion's hidden suffix, the tail
    of a lazy layout, a FIM stream's free slots), runs skip them all the same."""

    def __init__(self, layout, n_queries: int, rep: int, inv_freq: torch.Tensor):
        self.runs = self.cols = self.seen = None
        self.copy = False
        mask, n_keys, delta = layout.mask, layout.n_keys, layout.delta
        if mask is None and not delta.any():
            return
        seen = np.ones(n_keys, dtype=bool) if mask is None else mask.any(0).cpu().numpy()
        self.seen = seen  # (n_keys,) the columns some query sees
        many = n_queries >= LAZY_MAX_QUERIES
        pending = bool(delta[seen].any())
        # with nothing pending, too few unseen columns to skip ends it here (no stretch of MIN_SKIP)
        if not pending and n_keys - np.count_nonzero(seen) < (MIN_SKIP if many else max(SKIP_ALONE, n_keys // 4)):
            return
        runs = delta_runs(delta, seen)
        kept = sum(b - a for a, b, _ in runs)
        if not pending and many and n_queries * rep * (n_keys - kept) < COPY_SKIP * kept:
            return
        self.runs = runs
        dev = inv_freq.device
        cols = np.concatenate([np.arange(a, b) for a, b, _ in self.runs])
        self.cols = torch.from_numpy(cols).to(dev)
        self.copy = many
        self.delta = None  # the copy's deltas, where some are pending (rotated)
        if self.copy and pending:
            self.delta = torch.from_numpy(np.concatenate([np.full(b - a, d) for a, b, d in self.runs])).to(dev)
            self.pos, self.inv_freq = torch.from_numpy(layout.pos[cols]).to(dev), inv_freq

    def rotated(self, K, V):
        """K and V (1, Hkv, N, D) as the copy path attends to them (as they are without runs)."""
        if self.runs is None:
            return K, V
        if self.delta is None:  # unseen columns left out, nothing pending
            return K.index_select(2, self.cols), V.index_select(2, self.cols)
        K = kernels.rotated_keys(K, self.cols, self.delta, self.inv_freq, positions=self.pos)
        return K, V.index_select(2, self.cols)


def attend(q, K, V, attn_mask, scaling: float, bf16: bool = False, causal_tail: bool = False):
    """Attention over every column of K, V: q (1, H, n, D), K and V (1, Hkv, N, D), attn_mask
    (n, N) additive or None. Returns (1, H, n, D). A decode step's few queries score as one
    matmul per kv head group, which reads each key once; more go through SDPA, in bf16 when
    asked (an encode at precision bf16: the cache stays fp32, only this pass's arithmetic
    rounds, as in its projections; the output stays bf16, for the output projection).
    causal_tail: attn_mask is 0 on every column but the last n, and causal on those (an encode
    chunk after text it all sees); they are attended apart and merged (the same attention)."""
    _, H, n, D = q.shape
    Hkv = K.shape[1]
    if n > FEW_QUERIES:
        if bf16:
            b = torch.bfloat16
            q, K, V = q.to(b), K.to(b), V.to(b)
            attn_mask = None if attn_mask is None else attn_mask.to(b)
        if causal_tail:
            a = K.shape[2] - n
            # the CPU kernel divides by the key count: an empty part would kill the process (SIGFPE)
            assert a > 0 and q.device.type == "cpu", "causal_tail: a CPU chunk after at least one column it sees"
            seen = FLASH_CPU(q, K[:, :, :a], V[:, :, :a], scale=scaling)[:2]
            own = FLASH_CPU(q, K[:, :, a:], V[:, :, a:], is_causal=True, scale=scaling)[:2]
            return merge([seen, own])[0]
        return F.scaled_dot_product_attention(q, K, V, attn_mask=attn_mask, scale=scaling, enable_gqa=H != Hkv)
    rep = H // Hkv
    s = torch.matmul(q.reshape(1, Hkv, rep * n, D), K.transpose(-1, -2)).mul_(scaling)  # (1, Hkv, rep*n, N)
    if attn_mask is not None:
        s = s.view(1, Hkv, rep, n, -1).add_(attn_mask).view(1, Hkv, rep * n, -1)
    return torch.matmul(torch.softmax(s, dim=-1), V).view(1, H, n, D)


def attention_with_deltas(q_raw, K, V, rope, runs, attn_mask, scaling: float, with_lse: bool = False):
    """Attention where the keys of each run (a, b, d) belong d positions later than rotated;
    key columns outside every run are not attended.

    q_raw: (1, H, n, D) queries before RoPE; rope(q, d) rotates them to their positions minus d.
    K, V: (1, Hkv, N, D). attn_mask: (n, M) additive over the runs' columns, in run order, or
    None. Returns (1, H, n, D); with_lse, also each query's log-sum-exp of scores (1, H, n)."""
    _, H, n, D = q_raw.shape
    Hkv = K.shape[1]
    rep = H // Hkv                                              # query heads per kv head (GQA)
    M = sum(b - a for a, b, _ in runs)
    qd = {d: rope(q_raw, d).view(1, Hkv, rep, n, D) for d in sorted({r[2] for r in runs})}
    out = torch.empty(1, Hkv, rep, n, D, dtype=q_raw.dtype, device=q_raw.device)
    lse = torch.empty(1, Hkv, rep, n, dtype=torch.float32, device=q_raw.device) if with_lse else None
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
        if with_lse:
            lse[:, :, :, q0:q1] = torch.logsumexp(s, dim=-1)
        p = F.softmax(s, dim=-1).to(V.dtype).view(1, Hkv, rep * m, M)
        o, at = None, 0
        for a, b, _ in runs:
            part = torch.matmul(p[..., at: at + b - a], V[:, :, a:b])   # (1, Hkv, rep * m, D)
            o = part if o is None else o.add_(part)
            at += b - a
        out[:, :, :, q0:q1] = o.view(1, Hkv, rep, m, D)
    if with_lse:
        return out.view(1, H, n, D), lse.view(1, H, n)
    return out.view(1, H, n, D)


def attend_lse(q, K, V, attn_mask, scaling: float, mask_rows: torch.Tensor | None = None):
    """Attention over every column of K, V with each query's log-sum-exp of scores, for merging
    with attention over other columns (merge): q (1, H, n, D), K and V (1, Hkv, N, D), attn_mask
    (n, N) additive or None. Returns (1, H, n, D) and (1, H, n) fp32 (-inf where a query sees
    no column). On a CPU, torch's fused flash attention, each kv head's query heads as rows of
    one matrix (GQA without copying keys): mask_rows is attn_mask repeated for them
    (flash_rows), when the caller keeps it across layers; elsewhere plain matmuls, in blocks of
    queries (MAX_SCORES)."""
    _, H, n, D = q.shape
    Hkv, N = K.shape[1], K.shape[2]
    rep = H // Hkv
    if q.device.type == "cpu" and q.dtype == K.dtype == V.dtype:
        if mask_rows is None and attn_mask is not None:
            mask_rows = flash_rows(attn_mask, rep)
        o, lse = FLASH_CPU(q.reshape(1, Hkv, rep * n, D), K, V, attn_mask=mask_rows, scale=scaling)
        lse = lse.reshape(1, H, n).float()
        if attn_mask is not None:  # the kernel answers 0 for a row that sees nothing
            lse = lse.masked_fill(torch.isneginf(attn_mask).all(-1), float("-inf"))
        return o.reshape(1, H, n, D), lse
    # elsewhere: one run of keys with no delta (q is already at its positions)
    return attention_with_deltas(q, K, V, lambda t, _d: t, [(0, N, 0)], attn_mask, scaling, with_lse=True)


def flash_rows(attn_mask: torch.Tensor, rep: int) -> torch.Tensor:
    """(n, N) -> (rep * n, N): the mask of each kv head's rep query heads stacked as rows."""
    return attn_mask.repeat(rep, 1)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from attention over each: parts of (out
    (1, H, n, D), lse (1, H, n)), weighted by each part's share of the softmax's denominator.
    A part whose keys a query does not see at all has lse -inf there and weighs nothing."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])                 # (P, 1, H, n)
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)                                      # (P, 1, H, n)
    total = w.sum(0)
    share = (w / total)[..., None]                                 # (P, 1, H, n, 1)
    # bf16 parts (an encode at bf16) are summed in fp32, rounded once
    out = parts[0][0].float() * share[0]
    for s, (o, _) in zip(share[1:], parts[1:]):
        out.addcmul_(o, s)
    return out.to(parts[0][0].dtype), top + torch.log(total)
