"""A cache region: one position group's slots in a KVCache, and what each slot holds.

A region is `cap` slots from `slot0`; the first `used` hold the group's `n` tokens, or the holes
deleted tokens left under `lazy`. Token i's K/V sit at local slot i, or at order[i] while a lazy
layout is live (new tokens go to fresh slots after the used ones). Per slot the region knows:

    pos     the position the key is rotated to (`conflict` leaves moved ones where they were)
    delta   a pending delta: the key belongs at pos + delta (lazy; attention rotates the query)
    stale   its K/V were computed without seeing the current text before the token
    dirty   no K/V yet: an encode still to run, or one interrupted
    epoch   the edit (clock) at which its K/V were computed: how old they are

Every change to them is a method here, and `_rotate` is the one caller of rerotate_keys_: splice
(an edit's plan: keys moved and rotated), splice_lazy (deltas recorded instead), shift (a run of
tokens moved in position), compact (pending deltas applied), grow, relocate, fork and free.
"""
from __future__ import annotations

import numpy as np
import torch

from livekv import kernels

from .kv_cache import slack
from .strategies import change_points

ARRAYS = ("pos", "delta", "stale", "dirty", "epoch")  # what is known of each slot


class Region:
    def __init__(self, kv, n: int, cap: int | None = None):
        cap = n + slack(n) if cap is None else cap
        assert cap >= n, (cap, n)
        self.kv, self.cap = kv, cap
        self.n = self.used = n
        self.order: np.ndarray | None = None
        self.pos, self.delta, self.epoch = (np.zeros(cap, dtype=np.int64) for _ in range(3))
        self.stale, self.dirty = np.zeros(cap, dtype=bool), np.zeros(cap, dtype=bool)
        self.compactions = self.clock = 0  # clock: splices so far
        self.slot0 = kv.alloc(self, cap)

    # -- reading -----------------------------------------------------------------------------
    def local(self, idx: np.ndarray | None = None):
        """The local slots of token indices idx (all tokens when None; a slice when contiguous)."""
        if self.order is None:
            return slice(0, self.n) if idx is None else idx
        return self.order if idx is None else self.order[idx]

    def slots(self, idx: np.ndarray | None = None):
        """The cache slots of token indices idx (all tokens when None; a slice when contiguous)."""
        s = self.local(idx)
        return slice(self.slot0 + s.start, self.slot0 + s.stop) if isinstance(s, slice) else self.slot0 + s

    def span(self, j: int):
        """The cache slots of tokens [0, j), in token order."""
        return slice(self.slot0, self.slot0 + j) if self.order is None else self.slot0 + self.order[:j]

    @property
    def end(self) -> int:
        """One past the last slot holding a token of this region (or a hole)."""
        return self.slot0 + self.used

    def positions(self) -> np.ndarray:
        """(n,) the position each token's key stands for, pending deltas included."""
        s = self.local()
        return self.pos[s] + self.delta[s]

    def ages(self) -> np.ndarray:
        """(n,) how many splices ago each token's K/V were computed."""
        return self.clock - self.epoch[self.local()]

    def stale_tokens(self) -> np.ndarray:
        return self.stale[self.local()].copy()

    def dirty_tokens(self) -> np.ndarray:
        return self.dirty[self.local()].copy()

    def token_of_slot(self) -> np.ndarray:
        """(used,) the token index each local slot holds, -1 for a hole."""
        tok = np.full(self.used, -1, dtype=np.int64)
        tok[self.local()] = np.arange(self.n)
        return tok

    def segments(self) -> int:
        """Runs of equal pending delta among the live slots, in slot order."""
        if self.n == 0:
            return 0
        d = self.delta[: self.used][self.token_of_slot() >= 0]
        return 1 + int(np.count_nonzero(np.diff(d)))

    # -- marks ----------------------------------------------------------------------------------
    def place(self, positions: np.ndarray) -> None:
        """Every token to be encoded at these positions (a new group)."""
        assert self.order is None and len(positions) == self.n
        self.pos[: self.n], self.delta[: self.n] = positions, 0
        self.stale[: self.n], self.dirty[: self.n] = False, True

    def mark_stale(self, which: np.ndarray | None = None) -> None:
        """Tokens whose K/V did not see the current text before them (all when None; else a
        bool mask over tokens, or token indices)."""
        idx = None if which is None else np.flatnonzero(which) if which.dtype == bool else which
        self.stale[self.local(idx)] = True

    def mark_dirty(self, idx: np.ndarray) -> np.ndarray:
        """Tokens idx to be encoded again; returns the local slots that were not dirty yet."""
        at = self.local(np.asarray(idx, dtype=np.int64))
        marked = at[~self.dirty[at]]
        self.dirty[marked] = True
        return marked

    def unmark_dirty(self, marked: np.ndarray) -> None:
        """Give back marks mark_dirty made: those slots keep the K/V they have."""
        self.dirty[marked] = False

    def writing(self, idx: np.ndarray, positions: np.ndarray) -> None:
        """Tokens idx are about to get new K/V at these positions (no delta pending)."""
        at = self.local(idx)
        self.pos[at], self.delta[at] = positions, 0

    def written(self, idx: np.ndarray, stale: np.ndarray) -> None:
        """Tokens idx hold their new K/V; stale says which of them attended to stale K/V."""
        at = self.local(idx)
        self.dirty[at], self.stale[at], self.epoch[at] = False, stale, self.clock

    # -- layout changes ---------------------------------------------------------------------------
    def splice(self, keep: np.ndarray, positions: np.ndarray, rotate: bool) -> int:
        """Carry out an edit's plan: keep[i] is the old token index new token i keeps (-1: to be
        encoded), at positions[i]. Kept K/V move to their new slots in one pass per run and,
        with rotate, their keys are rotated to the new positions. Returns keys rotated."""
        rotated = self.compact()
        self.clock += 1
        T = len(keep)
        new_idx = np.flatnonzero(keep >= 0)
        old_idx = keep[new_idx]
        self.grow(max(T, self.n) + 16)
        # Runs of tokens that move together. Left-movers go first in ascending order, right-movers
        # last in descending order: then no move overwrites a source that is still to be read.
        if len(new_idx):
            shift = new_idx - old_idx
            brk = np.flatnonzero((np.diff(new_idx) != 1) | (np.diff(shift) != 0)) + 1
            runs = [(int(old_idx[a]), int(new_idx[a]), int(b - a))
                    for a, b in zip(np.concatenate([[0], brk]), np.concatenate([brk, [len(new_idx)]]))]
            for src, dst, n in [r for r in runs if r[1] < r[0]]:
                self._move(src, dst, n)
            for src, dst, n in sorted([r for r in runs if r[1] > r[0]], reverse=True):
                self._move(src, dst, n)
        self.n = self.used = T
        enc_idx = np.flatnonzero(keep < 0)
        changes = change_points(keep)
        if len(changes):  # kept tokens after a change never saw it
            self.stale[new_idx[new_idx >= changes[0]]] = True
        self.stale[enc_idx], self.dirty[enc_idx] = False, True
        if rotate and len(new_idx):
            delta = positions[new_idx] - self.pos[new_idx]
            moved = new_idx[delta != 0]
            if len(moved):
                a, b = int(moved[0]), int(moved[-1]) + 1
                d = np.zeros(b - a, dtype=np.int64)
                d[moved - a] = delta[delta != 0]
                rotated += self.shift(a, b, d)
        self.pos[enc_idx] = positions[enc_idx]
        return rotated

    def splice_lazy(self, keep: np.ndarray, positions: np.ndarray, max_segments: int) -> int:
        """An edit's plan without touching kept K/V: kept tokens keep their slots and get a pending
        delta, new tokens fresh slots after the used ones. Compacts past max_segments runs, or when
        holes outnumber half the tokens. Returns keys rotated (0 unless it compacted)."""
        self.clock += 1
        T = len(keep)
        new_idx = np.flatnonzero(keep >= 0)
        enc_idx = np.flatnonzero(keep < 0)
        old_order = self.order if self.order is not None else np.arange(self.n, dtype=np.int64)
        self.grow(self.used + len(enc_idx) + 16)
        order = np.empty(T, dtype=np.int64)
        order[new_idx] = old_order[keep[new_idx]]
        order[enc_idx] = self.used + np.arange(len(enc_idx))
        self.order, self.n, self.used = order, T, self.used + len(enc_idx)
        kept, fresh = order[new_idx], order[enc_idx]
        changes = change_points(keep)
        if len(changes):  # kept tokens after a change never saw it
            self.stale[kept[new_idx >= changes[0]]] = True
        self.stale[fresh], self.dirty[fresh] = False, True
        self.pos[fresh], self.delta[fresh] = positions[enc_idx], 0
        self.delta[kept] = positions[new_idx] - self.pos[kept]
        if self.segments() > max_segments or self.used - self.n > self.n // 2 + 256:
            return self.compact()
        return 0

    def shift(self, a: int, b: int, delta) -> int:
        """Move tokens [a, b) in position by delta (an int, or one per token): keys rotated and
        positions updated; token order is slot order here (not lazy). Returns keys rotated."""
        assert self.order is None and 0 <= a <= b <= self.n, (a, b, self.n)
        d = np.array(np.broadcast_to(np.asarray(delta, dtype=np.int64), (b - a,)))
        moved = int(np.count_nonzero(d))
        if moved:
            self._rotate(self.slot0 + a, d, self.pos[a:b])
            self.pos[a:b] += d
        return moved

    def compact(self) -> int:
        """Rotate every pending key for real and put the region back in token order. O(tokens
        after the first one out of place). Returns the keys rotated."""
        if self.order is None:
            return 0
        n, order = self.n, self.order
        delta = self.delta[order]
        moved = (order != np.arange(n)) | (delta != 0)
        f = int(np.argmax(moved)) if moved.any() else n             # tokens before f are in place
        src, delta = order[f:], delta[f:]
        rotated = int(np.count_nonzero(delta))
        if f < n:
            self._rotate(self.slot0 + f, delta, self.pos[src], src=self.slot0 + src)
            for name in ARRAYS[2:]:
                getattr(self, name)[f:n] = getattr(self, name)[src]
            self.pos[f:n] = self.pos[src] + delta
        self.delta[: self.used] = 0
        self.order, self.used = None, n
        self.compactions += 1
        return rotated

    def _rotate(self, dst: int, delta: np.ndarray, positions: np.ndarray, src: np.ndarray | None = None) -> None:
        """Rotate the keys of slots [dst, dst + len(delta)) by delta, from positions; with src, first
        gather K/V from slots src into them (a compaction), layer by layer: the copy stays small."""
        kv, dev = self.kv, self.kv.k.device
        delta_t, pos_t = (torch.from_numpy(np.array(a, dtype=np.int64)).to(dev) for a in (delta, positions))
        m = len(delta)
        if src is None:  # one call for every layer: the layer axis is the kernel's batch axis
            kernels.rerotate_keys_(kv.k[:, :, dst: dst + m], delta_t, kv.inv_freq, positions=pos_t)
        else:
            src_t = torch.from_numpy(src).to(dev)
            rotate = bool(np.count_nonzero(delta))
            for i in range(kv.k.shape[0]):
                k = kv.k[i].index_select(1, src_t)[None]            # (1, Hkv, m, D)
                if rotate:
                    kernels.rerotate_keys_(k, delta_t, kv.inv_freq, positions=pos_t)
                kv.k[i, :, dst: dst + m] = k[0]
                kv.v[i, :, dst: dst + m] = kv.v[i].index_select(1, src_t)
        kv.changed(dst, dst + m, values=src is not None)  # a rotation alone leaves V as it was

    def _move(self, src: int, dst: int, n: int) -> None:
        """Move n local slots from src to dst (the ranges may overlap): K/V and what is known."""
        self.kv.move(self.slot0 + src, self.slot0 + dst, n)
        for name in ARRAYS:
            arr = getattr(self, name)
            arr[dst: dst + n] = arr[src: src + n].copy()

    # -- memory -----------------------------------------------------------------------------------
    def grow(self, need: int) -> None:
        """At least `need` slots: in place when this is the cache's last region, else by moving to
        the top (the used slots are kept)."""
        if need <= self.cap:
            return
        new_cap = max(need, 2 * self.cap)
        if self.kv.extend(self.slot0, self.cap, new_cap):
            self._resize(new_cap)
        else:
            self.relocate(self.kv.alloc(self, new_cap), new_cap)

    def relocate(self, dst: int, cap: int | None = None) -> int:
        """Move to slot dst with cap slots, by default trimmed (KVCache.pack); returns the cap."""
        cap = max(self.used + 64, min(self.cap, 2 * self.used + 64)) if cap is None else cap
        self.kv.move(self.slot0, dst, self.used)
        self.slot0 = dst
        self._resize(cap)
        return cap

    def _resize(self, cap: int, into: "Region | None" = None) -> None:
        """The per-slot arrays at cap slots (the used ones kept), here or copied into `into`."""
        into = self if into is None else into
        for name in ARRAYS:
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: min(cap, self.used)] = old[: min(cap, self.used)]
            setattr(into, name, new)
        into.cap = cap

    def scratch(self, need: int) -> int:
        """The first of `need` free slots for a completion's own tokens: after the used ones when
        they fit (growing in place when this is the last region), else past every region."""
        if self.used + need > self.cap and self.slot0 + self.cap == self.kv.top:
            self.grow(self.used + need)
        if self.used + need <= self.cap:
            return self.slot0 + self.used
        return self.kv.scratch(need)

    def fork(self, kv, cap: int | None = None) -> "Region":
        """An independent copy in kv (another cache, or this one): layout, K/V and marks."""
        cap = self.used + slack(self.used) if cap is None else cap
        new = Region.__new__(Region)
        new.kv, new.n, new.used, new.compactions, new.clock = kv, self.n, self.used, self.compactions, self.clock
        new.order = None if self.order is None else self.order.copy()
        self._resize(cap, into=new)
        new.slot0 = kv.alloc(new, cap)
        s, d = slice(self.slot0, self.end), slice(new.slot0, new.end)
        kv.k[:, :, d], kv.v[:, :, d] = self.kv.k[:, :, s], self.kv.v[:, :, s]
        kv.changed(new.slot0, new.end)
        return new

    def free(self) -> None:
        self.kv.release(self)
