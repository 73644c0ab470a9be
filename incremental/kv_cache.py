"""The KV cache: every layer's keys and values in one buffer, handed out to regions.

Keys and values live in (L, Hkv, capacity, D) buffers so that one kernel call can re-rotate a
token range across every layer (the layer axis plays the kernel's batch axis). Each position
group owns a Region of slots (region.py), which knows what each of its slots holds; the cache
only hands out slot ranges, grows the buffers, and packs regions down when freed ones left
holes. Slot order is memory order only: what a query sees is decided by the attention layout
(layout.py), and where a key sits in position space by its RoPE rotation, so a region can move
in memory without touching positions. Slots past the last region are scratch for a
completion's own tokens.

The cache also keeps reduced-precision copies of its K/V (kv_mirror.py): a bf16 one while an
encode of several chunks at bf16 holds it (`mirrored`), and an fp16 one for good once a document
decodes at reduced precision (`keep_mirror`).
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch

from .host_memory import move_slots_
from .kv_mirror import Mirror


def slack(n: int) -> int:
    """Free slots a region of n tokens gets beyond them: room for edits and a completion's
    tokens, so that typing does not regrow (copy) a whole cache on its first insertion."""
    return 64 + n // 8


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, inv_freq: torch.Tensor, capacity: int = 256):
        """inv_freq: the model's fp32 RoPE frequencies (D/2,), which rotating its keys needs."""
        self.shape = (n_layers, n_kv_heads, head_dim)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self.k = torch.zeros(n_layers, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (L, Hkv, C, D)
        self.v = torch.zeros_like(self.k)                                                            # (L, Hkv, C, D)
        # weak: a dropped document frees its slots at once instead of waiting in a reference
        # cycle for the garbage collector
        self.regions: weakref.WeakSet = weakref.WeakSet()
        self.top = 0                        # end of the last region: scratch starts here
        self._bf16_users = 0                # encodes holding the bf16 copy (mirrored)
        self._kept: set[torch.dtype] = set()  # copies kept whoever holds them (keep_mirror)
        self.mirrors: dict[torch.dtype, Mirror] = {}

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def bytes_per_token(self) -> int:
        """K and V of one slot, with the copies that are kept."""
        L, H, D = self.shape
        return 2 * L * H * D * (self.k.element_size() + sum(d.itemsize for d in self._kept))

    def reserve(self, n: int) -> None:
        """Make room for at least n slots, keeping what every slot holds."""
        if n <= self.capacity:
            return
        self._reallocate(max(n, 2 * self.capacity))

    def shrink(self, headroom: int = 256) -> bool:
        """Give back buffer room past the top slot when it is most of the buffer (after closes and
        evictions: reserve only ever doubles). Returns whether the buffers were reallocated."""
        keep = self.top + headroom
        if self.capacity <= 2 * keep:
            return False
        self._reallocate(keep)
        return True

    def _reallocate(self, cap: int) -> None:
        """Buffers of cap slots, holding what the slots below top held; the copies are remade."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[0], old.shape[1], cap, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, : self.top] = old[:, :, : self.top]
            setattr(self, name, new)
        self.mirrors.clear()

    # -- slot ranges (Region calls these) -------------------------------------------------------
    def alloc(self, region, cap: int) -> int:
        """cap slots at the top for region; returns the first."""
        slot0 = self.top
        self.reserve(slot0 + cap)
        self.top = slot0 + cap
        self.regions.add(region)
        return slot0

    def extend(self, slot0: int, cap: int, new_cap: int) -> bool:
        """Grow the range [slot0, slot0 + cap) to new_cap slots in place; only the last one can."""
        if slot0 + cap != self.top:
            return False
        self.reserve(slot0 + new_cap)
        self.top = slot0 + new_cap
        return True

    def release(self, region) -> None:
        self.regions.discard(region)
        self.top = max([r.slot0 + r.cap for r in self.regions], default=0)

    def scratch(self, need: int) -> int:
        """The first of `need` slots past every region, for a completion's own tokens."""
        self.reserve(self.top + need)
        return self.top

    def pack(self) -> int:
        """Move the regions down to close the holes freed ones left; returns slots reclaimed."""
        before, at = self.top, 0
        for region in sorted(self.regions, key=lambda r: r.slot0):
            at += region.relocate(at)
        self.top = at
        return before - at

    # -- slots ------------------------------------------------------------------------------------
    def move(self, src: int, dst: int, n: int) -> None:
        """Move the K/V of n slots from src to dst (the ranges may overlap)."""
        if n <= 0 or src == dst:
            return
        self.reserve(max(src, dst) + n)
        move_slots_(self.k, src, dst, n)
        move_slots_(self.v, src, dst, n)
        for m in self.mirrors.values():  # a copy moves along: its valid columns stay valid
            m.move(src, dst, n)

    def write(self, i: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer i's K/V (Hkv, m, D) into slots: slots..slots+m (an int) or the given (m,) slots."""
        if isinstance(slots, int):
            self.k[i, :, slots: slots + k.shape[1]] = k
            self.v[i, :, slots: slots + k.shape[1]] = v
        else:
            self.k[i].index_copy_(1, slots, k)
            self.v[i].index_copy_(1, slots, v)
        for m in self.mirrors.values():  # a copy follows a write at once: a step's one row, a chunk
            m.write(i, slots, k, v)

    def changed(self, lo: int = 0, hi: int | None = None, values: bool = True) -> None:
        """K (and V, with values) of slots [lo, hi) (to the end without hi) changed other than by
        write or move (a rotation, which leaves V alone; a compaction's gather; a copy in)."""
        for m in self.mirrors.values():
            m.changed((self.k, self.v), lo, hi, values)

    def keep_mirror(self, dtype: torch.dtype) -> None:
        """Keep a copy in dtype from now on, whoever holds it (fp16: a decode at reduced precision)."""
        self._kept.add(dtype)

    @contextlib.contextmanager
    def mirrored(self):
        """While held, layer_bf16 reads a bf16 copy that it brings up to date column by column
        (an encode of many chunks holds it); the copy is freed when its last holder lets go."""
        self._bf16_users += 1
        try:
            yield
        finally:
            self._bf16_users -= 1
            if not self._bf16_users and torch.bfloat16 not in self._kept:
                self.mirrors.pop(torch.bfloat16, None)

    def layer_bf16(self, i: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values (1, Hkv, n_keys, D) in bf16: from the copy while one is held,
        else cast now."""
        return self.layer_as(i, n_keys, torch.bfloat16)

    def layer_as(self, i: int, n_keys: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values (1, Hkv, n_keys, D) in dtype: from its copy where one is held
        or kept (casting only the columns changed since it last read them), else cast now."""
        if not (dtype in self._kept or (dtype == torch.bfloat16 and self._bf16_users)):
            K, V = self.layer(i, n_keys)
            return K.to(dtype), V.to(dtype)
        if dtype not in self.mirrors:
            self.mirrors[dtype] = Mirror(self.k, dtype)
        return self.mirrors[dtype].layer((self.k, self.v), i, n_keys)

    def layer(self, i: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, Hkv, n_keys, D) of layer i's keys and values (no copy)."""
        return self.k[i, :, :n_keys].unsqueeze(0), self.v[i, :, :n_keys].unsqueeze(0)

    def columns(self, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
        """(delta, pos), each (n_keys,): every slot's pending delta and the position its key is
        rotated to, from the regions that hold them (0 elsewhere: scratch, freed slots)."""
        delta = np.zeros(n_keys, dtype=np.int64)
        pos = np.zeros(n_keys, dtype=np.int64)
        for r in self.regions:
            a, b = r.slot0, min(r.slot0 + r.used, n_keys)
            if a < b:
                delta[a:b] = r.delta[: b - a]
                pos[a:b] = r.pos[: b - a]
        return delta, pos
