"""A position group: tokens encoded from a base position into one cache region, and what other
groups see of it.

Every Document is one (groups.py puts a shared prefix, context files and active documents side
by side in one cache; fim.py adds one-token marker groups). A group's tokens are encoded from
pos0 (its prompt layout says exactly where: prompt.py, fim.py); it attends to the groups in
`sees` before it; its cache slots are a Region, which owns their layout (region.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np

from .prompt import PrefixPrompt
from .region import Region


@contextmanager
def in_use(*groups):
    """While a stepper reads or writes these groups (across its yields), a budget leaves them be."""
    for g in groups:
        g.users += 1
    try:
        yield
    finally:
        for g in groups:
            g.users -= 1


class PositionGroup:
    """Mixed into Document; its methods are the only ones that change pos0, sees and prompt."""

    def __init__(self, kv, pos0: int, sees: Sequence, n: int):
        """n tokens to be encoded from pos0 in a new region of kv, after the groups `sees`."""
        self.kv, self.pos0, self.sees = kv, pos0, list(sees)
        self.users = 0  # running steppers that read or write this group (in_use): not to be evicted
        self.prompt = PrefixPrompt()
        self.region = Region(kv, n)
        self.region.place(self.position_of(np.arange(n)))

    def position_of(self, idx: np.ndarray) -> np.ndarray:
        """The position token index idx is encoded at (pos0 + idx; one later after a FIM gap)."""
        return self.prompt.position_of(self, idx)

    @property
    def n(self) -> int:
        return self.region.n

    @property
    def end(self) -> int:
        return self.region.end

    @property
    def slot0(self) -> int:
        return self.region.slot0

    def cached(self) -> tuple:
        """Views (L, Hkv, n, D) of this document's cached keys and values, in token order, each
        key rotated to its position (a lazy layout is compacted first)."""
        self.compact()
        s = self.region.slots()
        return self.kv.k[:, :, s], self.kv.v[:, :, s]

    def compact(self) -> int:
        """Apply a lazy layout's pending deltas for real; returns the keys rotated."""
        return self.region.compact()

    @property
    def positions(self) -> np.ndarray:
        """The position each token's key stands for (pending lazy deltas included)."""
        return self.region.positions()

    @property
    def stale(self) -> np.ndarray:
        """Which tokens' K/V did not see the current text before them (a copy)."""
        return self.region.stale_tokens()

    @property
    def dirty(self) -> np.ndarray:
        """Which tokens still wait to be encoded (after settle=False edits or an interruption)."""
        return self.region.dirty_tokens()

    def encoded(self):
        """(slots, encoded): this group's slots in token order and which hold K/V; what a
        document that attends to this group may see (layout.context)."""
        return self.region.slots(), ~self.region.dirty_tokens()

    def has_stale(self) -> bool:
        return bool(self.region.stale_tokens().any())


    # -- the group ---------------------------------------------------------------------------
    def mark_stale(self, which: np.ndarray | None = None) -> None:
        """Mark tokens stale (all when which is None; else a bool mask over tokens)."""
        self.region.mark_stale(which)

    def attend_to(self, groups: Sequence) -> None:
        """The groups this document's tokens see before themselves, from now on."""
        self.sees = list(groups)

    @contextmanager
    def hiding(self, groups: Sequence):
        """While this document encodes or decodes, these groups it sees are hidden; its tokens
        encoded meanwhile never saw them, so they are stale."""
        if not groups:
            yield self
            return
        sees, dirty = self.sees, self.dirty
        self.sees = [g for g in sees if not any(g is h for h in groups)]
        try:
            yield self
        finally:
            self.sees = sees
            self.mark_stale(dirty & ~self.dirty)

    def move_to(self, pos0: int) -> int:
        """Move the whole group to start at pos0: one rotation of its keys, nothing re-encoded
        (a lazy layout is compacted first). Returns the keys rotated."""
        self.compact()
        rotated = self.region.shift(0, self.n, pos0 - self.pos0)
        self.pos0 = pos0
        return rotated

    def rebase(self, pos0: int) -> None:
        """Start at pos0, every token to be encoded there again (FIM's suffix marker, which moves
        with the gap)."""
        self.pos0 = pos0
        self.region.place(self.position_of(np.arange(self.n)))

    def set_prompt(self, prompt) -> None:
        """The prompt layout (FimStream.open); set before anything is encoded."""
        self.prompt = prompt

    def scratch(self, need: int) -> int:
        """The first of `need` free slots for a completion's own tokens (the target group)."""
        return self.region.scratch(need)

    def close(self) -> None:
        """Give the cache region back (the engine forgets the document too)."""
        self.region.free()
