"""One document's KV cache: all layers in one buffer, in token order, with per-token metadata.

Keys and values live in (L, Hkv, capacity, D) buffers so that one kernel call can re-rotate a
token range across every layer (the layer axis plays the kernel's batch axis). Slots [0, length)
hold the document's tokens in document order; slots past `length` are scratch for a completion's
own tokens, which are never part of the document.
"""
from __future__ import annotations

import numpy as np
import torch


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256):
        self.shape = (n_layers, n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.k = torch.zeros(n_layers, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (L, Hkv, C, D)
        self.v = torch.zeros_like(self.k)                                                            # (L, Hkv, C, D)
        self.length = 0
        # The position each cached key is rotated to. Equal to the slot index under pie; `conflict`
        # leaves moved keys at their old positions, which is exactly its defect.
        self.pos = np.zeros(capacity, dtype=np.int64)
        # A token is stale when its K/V were computed without seeing the current text before it.
        self.stale = np.zeros(capacity, dtype=bool)
        # A dirty token's K/V are not computed yet (an encode still to run, or one interrupted).
        self.dirty = np.zeros(capacity, dtype=bool)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def bytes_per_token(self) -> int:
        L, H, D = self.shape
        return 2 * L * H * D * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for at least n slots, keeping the document's tokens."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(old.shape[0], old.shape[1], cap, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        for name in ("pos", "stale", "dirty"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: self.length] = old[: self.length]
            setattr(self, name, new)

    def move(self, src: int, dst: int, n: int) -> None:
        """Move n slots from src to dst (ranges may overlap), K, V and metadata together."""
        if n <= 0 or src == dst:
            return
        self.reserve(max(src, dst) + n)
        for buf in (self.k, self.v):
            # copy_ refuses partially overlapping memory: go through a temporary
            buf[:, :, dst: dst + n] = buf[:, :, src: src + n].clone()
        for arr in (self.pos, self.stale, self.dirty):
            arr[dst: dst + n] = arr[src: src + n].copy()

    def gather(self, src_slots: np.ndarray) -> None:
        """Rebuild slots [0, len(src_slots)) from the given old slots, in order."""
        n = len(src_slots)
        self.reserve(n)
        idx = torch.from_numpy(np.ascontiguousarray(src_slots)).to(self.device)
        for name in ("k", "v"):
            buf = getattr(self, name)
            buf[:, :, :n] = buf.index_select(2, idx)
        for arr in (self.pos, self.stale, self.dirty):
            arr[:n] = arr[src_slots]
        self.length = n

    def layer(self, i: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, Hkv, n_keys, D) of layer i's keys and values (no copy)."""
        return self.k[i, :, :n_keys].unsqueeze(0), self.v[i, :, :n_keys].unsqueeze(0)

    def snapshot(self) -> dict:
        """A copy of the document part, for tests and for undoing a failed update."""
        n = self.length
        return {"k": self.k[:, :, :n].clone(), "v": self.v[:, :, :n].clone(),
                "pos": self.pos[:n].copy(), "stale": self.stale[:n].copy(), "dirty": self.dirty[:n].copy(),
                "length": n}

    def restore(self, snap: dict) -> None:
        n = snap["length"]
        self.reserve(n)
        self.k[:, :, :n] = snap["k"]
        self.v[:, :, :n] = snap["v"]
        self.pos[:n], self.stale[:n], self.dirty[:n], self.length = snap["pos"], snap["stale"], snap["dirty"], n
