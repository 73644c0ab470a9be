"""A reduced-precision copy of a KV cache's buffers (kv_cache.py holds them, one per dtype).

Two passes read the cache in 16 bits: an encode of several chunks at bf16 (each chunk attends in
bf16 over every column before it: casting them all again for every chunk and layer cost a 4k
open about 5% of its time), and a decode step at any precision but fp32, which reads every
column of the file at every token and is bound by those bytes at long context (fp16 there:
as fast through torch's fused CPU attention as bf16, with 8 times less rounding).

The copy is the cache's fp32 K/V cast, on the slots below a per-layer watermark (keys and
values apart: a rotation changes keys only). A write reaches the copy at once, a move moves it
along, and any other change (a rotation, a compaction's gather, a copy in) is either cast
again at once, when short (a FIM gap's move), or lowers the watermarks and is cast when read,
once however many changes came before (typing rotates the tail at every keystroke).
"""
from __future__ import annotations

import torch

from .host_memory import move_slots_

# changes of up to this many slots are cast into the copy at once (about 6 us a slot for the 0.5B
# coder's 24 layers), longer ones when next read
EAGER = 512


def moved(h: int, src: int, dst: int, n: int) -> int:
    """A watermark (the copy valid on slots below h) after slots [src, src + n) move to dst."""
    if h < dst:
        return h                          # the moved columns land past a stale one
    if h - src < n:
        return dst + max(0, h - src)      # valid until the first stale column moved in
    return max(h, dst + n)


class Mirror:
    """K and V (L, Hkv, C, D) in `dtype`, equal to the cache's cast below the watermarks."""

    def __init__(self, k: torch.Tensor, dtype: torch.dtype):
        with torch.inference_mode(False):  # a plain tensor: an edit outside a forward updates it too
            self.kv = (torch.empty(k.shape, dtype=dtype, device=k.device),
                       torch.empty(k.shape, dtype=dtype, device=k.device))
        self.hi = ([0] * k.shape[0], [0] * k.shape[0])   # keys', values' watermark per layer

    def write(self, i: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """As KVCache.write: layer i's (Hkv, m, D) rows into slots (an int: a run from it)."""
        for m, t in zip(self.kv, (k, v)):
            if isinstance(slots, int):
                m[i, :, slots: slots + t.shape[1]] = t
            else:
                m[i].index_copy_(1, slots, t.to(m.dtype))

    def move(self, src: int, dst: int, n: int) -> None:
        for m in self.kv:
            move_slots_(m, src, dst, n)
        self.hi = tuple([moved(h, src, dst, n) for h in his] for his in self.hi)

    def changed(self, cache: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int | None, values: bool) -> None:
        """The cache's (k, v) changed on slots [lo, hi) (to the end without hi): keys, and values too."""
        parts = (0, 1) if values else (0,)
        if hi is not None and hi - lo <= EAGER:
            for j in parts:
                self.kv[j][:, :, lo:hi] = cache[j][:, :, lo:hi]
            return
        for j in parts:
            self.hi[j][:] = [min(h, lo) for h in self.hi[j]]

    def layer(self, cache: tuple[torch.Tensor, torch.Tensor], i: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (1, Hkv, n_keys, D) keys and values, casting the cache's columns changed since."""
        for j, (m, t) in enumerate(zip(self.kv, cache)):
            a = self.hi[j][i]
            if a < n_keys:
                m[i, :, a:n_keys] = t[i, :, a:n_keys]
                self.hi[j][i] = n_keys
        mk, mv = self.kv
        return mk[i, :, :n_keys].unsqueeze(0), mv[i, :, :n_keys].unsqueeze(0)
