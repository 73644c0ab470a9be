"""One pass's attention inside a batched forward (Transformer.run): RoPE at its positions, its
K/V written into its own cache, and attention over the columns its layout shows it there.

A pass whose document sees context groups held in another cache (Pass.shared: the server's
shared contexts, shared.py) attends to those apart (hydragen.py), so here it also returns each
query's log-sum-exp, and the two are merged (attention.merge).

A decode step at reduced precision (Pass.kv16: decode.reads_fp16 says when) reads its cache's
fp16 copy (KVCache.keep_mirror, kv_mirror.py) through torch's fused CPU attention: at long
context such a step is bound by reading the K/V, and 16 bits halve that where the CPU computes
fp16 natively. The cache itself stays fp32, so rotations stay exact and an fp32 pass
reads what it always did.
"""
from __future__ import annotations

import numpy as np
import torch

from .attention import (CAUSAL_TAIL_MIN, FEW_QUERIES, PendingDeltas, attend, attend_lse,
                        attention_with_deltas, delta_runs, flash_rows, merge)
from .batch import Pass


class Rope:
    """RoPE at given positions: cos and sin (1, 1, n, D), HF's half-split pairs."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        half = cos.shape[-1] // 2
        # HF's rotate_half(t) * sin is t rolled by half times sin with its first half negated:
        # one copy of t instead of three, and the add fused (addcmul)
        self.cos, self.half = cos, half
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or queries (1, H, n, D) rotated to their positions."""
        return torch.addcmul(t * self.cos, t.roll(self.half, -1), self.sin)


def _causal_tail(mask: torch.Tensor) -> bool:
    """Whether a visibility mask (n, N) shows every column before the last n, and those causally."""
    n, N = mask.shape
    return bool(mask[:, : N - n].all()) and torch.equal(mask[:, N - n:], torch.ones(n, n, dtype=torch.bool).tril_())


class PassAttention:
    """One pass's share of a batched forward: its RoPE tables, its mask over its layout's
    columns and its pending deltas. It writes the pass's K/V into the pass's own cache and
    attends there."""

    def __init__(self, model, p: Pass, x: torch.Tensor):
        self.model, self.p, dev = model, p, model.device
        self.pos = p.pos.to(dev)
        mask = p.layout.mask
        self.pending = PendingDeltas(p.layout, p.n, model.n_heads // model.n_kv_heads, model.inv_freq.to(dev))
        # an encode chunk after text every query of it sees (a file's open, chunk by chunk): the
        # fused kernel then reads no mask, and skips the upper half of the chunk's own square
        self.causal_tail = (mask is not None and dev.type == "cpu" and p.n >= 64 and not p.shared
                            and self.pending.runs is None and mask.shape[1] - p.n >= CAUSAL_TAIL_MIN
                            and _causal_tail(mask))
        self.mask = None  # additive (n, n_keys), where attention reads one
        if mask is not None and not self.causal_tail:
            self.mask = torch.zeros(mask.shape, dtype=x.dtype, device=dev)
            self.mask.masked_fill_(~mask.to(dev), float("-inf"))
            if self.pending.runs is not None:
                self.mask = self.mask[:, self.pending.cols]            # the runs' columns only
        # attend_lse's mask, made once for every layer (a pass that sees groups apart needs it)
        self.mask_rows = None
        if p.shared and self.mask is not None:
            self.mask_rows = flash_rows(self.mask, model.n_heads // model.n_kv_heads)
        self.slots = p.slots if isinstance(p.slots, int) else p.slots.to(dev)
        self.tables: dict[int, Rope] = {}
        self.x = x
        # an encode at precision bf16 attends in bf16 too where that is faster (the cache stays
        # fp32); Transformer.run sets the pass's precision before it makes its PassAttentions
        self.bf16 = model.precision.mode == "bf16" and model.precision.bf16_attention
        self.mask_sdpa = self.mask  # attend()'s, cast once for all layers
        if self.bf16 and self.mask is not None:
            self.mask_sdpa = self.mask.to(torch.bfloat16)
        assert not p.kv16 or dev.type == "cpu", "an fp16 decode step reads through torch's CPU attention"
        self.fp16_decode = p.kv16
        if self.fp16_decode:
            p.kv.keep_mirror(torch.float16)
            self.decode_runs = self._decode_runs()
            if self.mask is not None and self.mask_rows is None:
                self.mask_rows = flash_rows(self.mask, model.n_heads // model.n_kv_heads)
        self.q: torch.Tensor | None = None  # this layer's queries at their positions (hydragen.py reads them)

    def _rope(self, q: torch.Tensor, d: int) -> torch.Tensor:
        """q rotated to its positions minus d (a pending delta)."""
        if d not in self.tables:
            c, s = self.model.rotary(self.x, (self.pos - d)[None])
            self.tables[d] = Rope(c[:, None], s[:, None])
        return self.tables[d](q)

    def attend(self, i: int, q, q_rot, k, v, write: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i, this pass's rows: queries before and after RoPE (1, H, m, D), keys (after)
        and values (1, Hkv, m, D) -> its attention over its own cache (1, H, m, D), and its
        log-sum-exp (1, H, m) when it sees groups apart (None otherwise)."""
        kv, n_keys, m = self.p.kv, self.p.layout.n_keys, q.shape[2]
        if write:  # (a probe attends to the cache as it is)
            kv.write(i, self.slots, k[0], v[0])
        pending, scaling, apart = self.pending, self.model.scaling, bool(self.p.shared)
        self.q = q_rot
        # attend's SDPA path at bf16 reads the keys and values in bf16: the cache's copy while held
        bf16_kv = self.bf16 and pending.runs is None and not apart and m > FEW_QUERIES
        if self.fp16_decode:
            return self._decode_fp16(q, q_rot, *kv.layer_as(i, n_keys, torch.float16), apart)
        K, V = kv.layer_bf16(i, n_keys) if bf16_kv else kv.layer(i, n_keys)  # (1, Hkv, n_keys, D)
        if pending.runs is None or pending.copy:
            K, V = pending.rotated(K, V)
            if apart:
                return attend_lse(q_rot, K, V, self.mask, scaling, self.mask_rows)
            return attend(q_rot, K, V, self.mask_sdpa, scaling, bf16=self.bf16, causal_tail=self.causal_tail), None
        out = attention_with_deltas(q, K, V, self._rope, pending.runs, self.mask, scaling, with_lse=apart)
        return out if apart else (out, None)

    def _decode_runs(self) -> list[tuple[int, int, int, int]]:
        """(a, b, d, at): the key columns [a, b) a decode step reads, with their pending delta d,
        and where they start in self.mask. The pending runs where there are any; else the seen
        columns, less long stretches nobody sees (a region's free slots: a FIM stream's suffix
        marker sits past them)."""
        if self.pending.runs is not None:
            starts = np.cumsum([0] + [b - a for a, b, _ in self.pending.runs])
            return [(a, b, d, int(at)) for (a, b, d), at in zip(self.pending.runs, starts)]
        n_keys, seen = self.p.layout.n_keys, self.pending.seen
        if self.p.layout.mask is None:
            return [(0, n_keys, 0, 0)]
        return [(a, b, 0, a) for a, b, _ in delta_runs(np.zeros(n_keys, dtype=np.int64), seen)]

    def _decode_fp16(self, q, q_rot, K, V, apart: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A few rows' attention over fp16 K, V (1, Hkv, N, D): each of its runs through the
        fused kernel with its log-sum-exp, the runs merged. Returns fp32 (1, H, m, D), and the
        log-sum-exp when apart."""
        parts = []
        for a, b, d, at in self.decode_runs:
            qd = (q_rot if d == 0 else self._rope(q, d)).to(K.dtype)
            mask = rows = None
            if self.mask is not None:
                mask = self.mask[:, at: at + b - a]
                rows = self.mask_rows[:, at: at + b - a]
            parts.append(attend_lse(qd, K[:, :, a:b], V[:, :, a:b], mask, self.model.scaling, rows))
        out, lse = merge(parts)
        return out.to(q.dtype), (lse if apart else None)
