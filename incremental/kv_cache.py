"""The KV cache: all layers in one buffer, split into regions, one region per position group.

Keys and values live in (L, Hkv, capacity, D) buffers so that one kernel call can re-rotate a
token range across every layer (the layer axis plays the kernel's batch axis). Each document
(a position group) owns a region of slots, in its own token order (under `lazy`, in the order
its tokens arrived, with holes: Document.order maps tokens to slots). Slot order is only memory
order: what a query sees is decided by the attention mask, and where a key sits in position
space by its RoPE rotation, so a region can move in memory without touching positions. Slots
past the last region are scratch for a completion's own tokens.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from .host_memory import move_slots_


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256):
        self.shape = (n_layers, n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.k = torch.zeros(n_layers, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (L, Hkv, C, D)
        self.v = torch.zeros_like(self.k)                                                            # (L, Hkv, C, D)
        # The position each cached key is rotated to. `conflict` leaves moved keys at their old
        # positions, which is exactly its defect.
        self.pos = np.zeros(capacity, dtype=np.int64)
        # A token is stale when its K/V were computed without seeing the current text before it.
        self.stale = np.zeros(capacity, dtype=bool)
        # A dirty token's K/V are not computed yet (an encode still to run, or one interrupted).
        self.dirty = np.zeros(capacity, dtype=bool)
        # Lazy deltas: a key belongs at pos + delta but is still rotated to pos; attention rotates
        # the query by -delta for it instead (RoPE scores depend on the difference only).
        self.delta = np.zeros(capacity, dtype=np.int64)
        # id(owner) -> [weakref(owner), slot0, cap]; weak, so a dropped document frees its memory
        # at once instead of waiting in a reference cycle for the garbage collector
        self.regions: dict[int, list] = {}
        self.top = 0                        # end of the last region: scratch starts here

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        return self.top

    def bytes_per_token(self) -> int:
        L, H, D = self.shape
        return 2 * L * H * D * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for at least n slots, keeping every region."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[0], old.shape[1], cap, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, : self.top] = old[:, :, : self.top]
            setattr(self, name, new)
        for name in ("pos", "stale", "dirty", "delta"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: self.top] = old[: self.top]
            setattr(self, name, new)

    # -- regions -----------------------------------------------------------------------------
    def alloc(self, owner, cap: int) -> int:
        """A region of cap slots at the top for owner; sets and returns owner.slot0."""
        slot0 = self.top
        self.reserve(slot0 + cap)
        self.top = slot0 + cap
        self.regions[id(owner)] = [weakref.ref(owner, self._forget(id(owner))), slot0, cap]
        owner.slot0, owner.cap = slot0, cap
        return slot0

    def _forget(self, key: int):
        me = weakref.ref(self)  # no strong reference back: the cache itself must not be in a cycle

        def gone(_ref):
            kv = me()
            if kv is not None:
                kv.regions.pop(key, None)
        return gone

    def grow(self, owner, need: int) -> None:
        """Give owner's region at least `need` slots: in place when it is the last region, else
        by moving it to the top (its first owner.used slots are kept)."""
        entry = self.regions[id(owner)]
        _, slot0, cap = entry
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        if slot0 + cap == self.top:
            self.reserve(slot0 + new_cap)
            self.top = slot0 + new_cap
        else:
            dst = self.top
            self.reserve(dst + new_cap)
            self.top = dst + new_cap
            self.move(slot0, dst, owner.used)
            slot0 = dst
        entry[1:] = [slot0, new_cap]
        owner.slot0, owner.cap = slot0, new_cap

    def free(self, owner) -> None:
        entry = self.regions.pop(id(owner), None)
        if entry is not None and entry[1] + entry[2] == self.top:
            self.top = max([e[1] + e[2] for e in self.regions.values()], default=0)

    def compact(self) -> int:
        """Pack the regions down to close the holes freed ones left; returns slots reclaimed."""
        before, at = self.top, 0
        for entry in sorted(self.regions.values(), key=lambda e: e[1]):
            ref, slot0, cap = entry
            owner = ref()
            if owner is None:
                continue
            keep = max(owner.used + 64, min(cap, 2 * owner.used + 64))
            if slot0 != at:
                self.move(slot0, at, owner.used)
            entry[1:] = [at, keep]
            owner.slot0, owner.cap = at, keep
            at += keep
        self.top = at
        return before - at

    # -- slots ---------------------------------------------------------------------------------
    def move(self, src: int, dst: int, n: int) -> None:
        """Move n slots from src to dst (ranges may overlap), K, V and metadata together."""
        if n <= 0 or src == dst:
            return
        self.reserve(max(src, dst) + n)
        move_slots_(self.k, src, dst, n)
        move_slots_(self.v, src, dst, n)
        for arr in (self.pos, self.stale, self.dirty, self.delta):
            arr[dst: dst + n] = arr[src: src + n].copy()

    def layer(self, i: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, Hkv, n_keys, D) of layer i's keys and values (no copy)."""
        return self.k[i, :, :n_keys].unsqueeze(0), self.v[i, :, :n_keys].unsqueeze(0)

    def snapshot(self, slot0: int, n: int) -> dict:
        """A copy of n slots from slot0 (for forks and tests)."""
        s = slice(slot0, slot0 + n)
        return {"k": self.k[:, :, s].clone(), "v": self.v[:, :, s].clone(), "pos": self.pos[s].copy(),
                "stale": self.stale[s].copy(), "dirty": self.dirty[s].copy(), "delta": self.delta[s].copy(), "n": n}

    def restore(self, snap: dict, slot0: int) -> None:
        n = snap["n"]
        s = slice(slot0, slot0 + n)
        self.reserve(slot0 + n)
        self.k[:, :, s], self.v[:, :, s] = snap["k"], snap["v"]
        self.pos[s], self.stale[s], self.dirty[s] = snap["pos"], snap["stale"], snap["dirty"]
        self.delta[s] = snap["delta"]
