"""Typed-ahead reuse: while a person types the suggestion they were shown, the rest of it is the
answer to the next request, with no model call.

The cache is never involved: the typed edits are applied as usual (so the cache stays exact);
this only decides what is decoded. A prefetched next line extends the shown suggestion, so that
accepting it and asking again also needs no model call.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shown:
    anchor: int        # char offset of the cursor the suggestion was made for
    before: str        # the document's text before the anchor at that time
    text: str          # the suggestion (possibly extended by a prefetched next line)


class TypeAhead:
    """The suggestion last shown for one document."""

    def __init__(self):
        self.shown: Shown | None = None
        self.hits = 0

    def remember(self, text: str, anchor: int, suggestion: str) -> None:
        self.shown = Shown(anchor, text[:anchor], suggestion) if suggestion else None

    def extend(self, suggestion: str, more: str) -> bool:
        """Append a prefetched continuation to the shown suggestion, if it is still the one."""
        if self.shown is None or self.shown.text != suggestion or not more:
            return False
        self.shown.text += more
        return True

    def lookup(self, text: str, cursor: int) -> str | None:
        """The rest of the shown suggestion when the text typed since matches its start."""
        s = self.shown
        if s is None:
            return None
        if cursor < s.anchor or not text.startswith(s.before) or len(text) < s.anchor:
            self.shown = None
            return None
        typed = text[s.anchor: cursor]
        if not s.text.startswith(typed):  # the person typed something else: drop it
            self.shown = None
            return None
        rest = s.text[len(typed):]
        if not rest:
            return None  # fully typed: a fresh decode decides what comes next
        self.hits += 1
        return rest

    def drop(self) -> None:
        self.shown = None
