"""FIM as a token stream: the PSM prompt of a document kept as one live cache.

    <|fim_prefix|> doc[:g] <|fim_suffix|> doc[g:] <|fim_middle|> ...middle...

The document's tokens stay in their region in text order; the two markers are one-token groups
beside them. The suffix tokens (index >= g, the gap) sit one position later, after the suffix
marker, and attend to it. Moving the cursor moves the gap: the tokens between the old and the new
gap change side and shift by one position, which is a PIE rotation, and the suffix marker is
encoded again (one token), instead of rebuilding the prompt. `<|fim_middle|>` is the first token
of every completion's tail. FimStream is the document's prompt layout (the interface in
prompt.py); models without these tokens keep masked prefix decoding (PrefixPrompt).
"""
from __future__ import annotations

import weakref

import numpy as np

from . import batch
from .prompt import Cursor, heal_last
from .strategies import change_points

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def fim_ids(tokenizer) -> tuple[int, int, int] | None:
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(t) for t in FIM_TOKENS]
    return None if any(i is None for i in ids) else tuple(ids)


class _Before:
    """The part of a document before its gap, as a group the suffix marker attends to."""

    def __init__(self, doc):
        self._doc = weakref.ref(doc)  # weak: no cycle keeps a closed document's cache alive

    @property
    def n(self) -> int:
        return self._doc().prompt.gap

    @property
    def slot0(self) -> int:
        return self._doc().region.slot0

    @property
    def kv(self):
        return self._doc().kv

    @property
    def end(self) -> int:
        return self.slot0 + self.n

    def encoded(self):
        return slice(self.slot0, self.end), ~self._doc().region.dirty[: self.n]

    def has_stale(self) -> bool:
        return bool(self._doc().region.stale[: self.n].any())


class FimStream:
    """The markers and the gap of one document's FIM stream."""
    lazy = False  # a lazy layout compacts first and then runs as pie

    def __init__(self, prefix_marker, suffix_marker, middle_id: int, gap: int, sided: np.ndarray):
        self.prefix_marker, self.suffix_marker, self.middle_id = prefix_marker, suffix_marker, middle_id
        self.gap = gap  # tokens from index gap on are the suffix
        # (n,) suffix tokens known to hold K/V encoded after the marker; False is the safe answer
        self.sided = sided
        self.seen = -1  # the document's edit clock at the last completion

    @classmethod
    def open(cls, engine, uri: str, text: str, strategy: str, gap_at: int | None = None):
        """A FIM document: its cache holds the prefix marker, the text, and the suffix marker.
        gap_at (a char offset) places the gap before encoding: a fresh PSM prompt, the rebuild."""
        from .document import Document
        pre, suf, mid = fim_ids(engine.tokenizer)
        kv = engine.new_cache(256)
        p = Document(engine, uri + "#fim-prefix", FIM_TOKENS[0], "full", kv=kv, pos0=0)
        doc = Document(engine, uri, text, strategy, kv=kv, pos0=1, sees=[p])
        s = Document(engine, uri + "#fim-suffix", FIM_TOKENS[1], "full", kv=kv, pos0=1 + doc.n, sees=[p, _Before(doc)])
        assert p.token_ids == [pre] and s.token_ids == [suf], "FIM markers must tokenize as single tokens"
        stream = cls(p, s, mid, gap=doc.n, sided=np.zeros(doc.n, dtype=bool))
        doc.set_prompt(stream)
        p.settle()
        if gap_at is not None:
            stream.move_gap(doc, stream.gap_for(doc, gap_at))
        stream.settle(doc)
        stream.sided[stream.gap:] = True
        return doc

    @property
    def marker_dirty(self) -> bool:
        """The suffix marker waits to be encoded at its position (the text before it changed)."""
        return bool(self.suffix_marker.region.dirty[:1].any())

    # -- the prompt layout interface ----------------------------------------------------------------
    def position_of(self, doc, idx: np.ndarray) -> np.ndarray:
        return doc.pos0 + idx + (idx >= self.gap)

    def before_splice(self, doc, keep: np.ndarray) -> None:
        """The suffix marker stays before the same old token; when the text before it changed it
        is encoded again, at its new position."""
        old = self.gap
        new_idx = np.flatnonzero(keep >= 0)
        k = int(np.searchsorted(keep[new_idx], old, side="left"))
        self.gap = int(new_idx[k]) if k < len(new_idx) else len(keep)
        sided = np.zeros(len(keep), dtype=bool)
        sided[new_idx] = self.sided[keep[new_idx]]  # the gap follows its token: the prefix stays False
        self.sided = sided
        changes = change_points(keep)
        if self.gap != old or (len(changes) and changes[0] < self.gap):
            self.suffix_marker.rebase(doc.pos0 + self.gap)

    def settle(self, doc, should_stop=None) -> bool:
        """Encode the dirty text before the gap, then, when suffix tokens wait to be encoded
        (an edit's recomputed ones, pie-window's or pie-blend's), the suffix marker first (dirty
        when the text before it changed): they attend to it at its new position. Otherwise the
        marker waits for the completion (settling)."""
        return batch.alone(doc.engine.model, self._encoding(doc, should_stop, None, marker=False))

    def also_sees(self, doc, idx: np.ndarray) -> list:
        return [(idx >= self.gap, self.suffix_marker)]  # the suffix comes after its marker

    def to_encode(self, doc, j: int) -> int:
        """A completion reads the whole stream: it waits for every dirty token and the marker."""
        return int(doc.region.dirty_tokens().sum()) + self.marker_dirty

    def settling(self, doc, j: int, should_stop=None, rider=None):
        """The completion's encode, as a stepper (batch.py), in settle's order, the marker
        included: the completion reads it. The rider (the completion's tail) joins the suffix's
        last pass, or the prefix's when nothing after it waits."""
        return self._encoding(doc, should_stop, rider, marker=True)

    def _encoding(self, doc, should_stop, rider, marker: bool):
        """The text before the gap, the suffix marker (when suffix tokens wait, or `marker`),
        the suffix; the rider joins the last of them that has work."""
        suffix = bool(doc.region.dirty_tokens()[self.gap:].any())
        marker = self.marker_dirty and (marker or suffix)
        if not (yield from doc.settling(should_stop, upto=self.gap, rider=None if suffix or marker else rider)):
            return False
        if marker and not (yield from self.suffix_marker.settling(should_stop)):
            return False
        return (yield from doc.settling(should_stop, rider=rider if suffix else None))

    def decode_groups(self) -> list:
        return [self.suffix_marker]

    def cursor(self, doc, c: int, extra: str, heal: bool) -> Cursor:
        """Move the gap to cursor c and mark what the completion needs encoded again (settling
        encodes it, cancellable, with the tail riding its last pass). The tail is the middle
        marker, then the text from the gap to the cursor (and `extra`), its last token healed."""
        old = self.gap
        moved = self.move_gap(doc, self.gap_for(doc, c))
        if doc.strategy == "full":
            if moved:  # the exact cache: all that the move left stale, as a rebuild
                doc.region.mark_dirty(np.flatnonzero(doc.region.stale_tokens()))
        elif moved or doc.region.clock != self.seen:  # else this was done for the last completion
            # What a middle joins up with, on both sides of the marker: the text right before it,
            # which, when the cursor moved down, was encoded as suffix (after the marker) and would
            # still read as text after the cursor, and the suffix right after it. And where the
            # marker was: the text around it was encoded as the two sides of the old cursor, and
            # would still read as the place to fill. Those when stale.
            w, g, n = doc.config.refresh_window, self.gap, doc.n
            spans = [(g - w, g + w)] + ([(old - w, old + w)] if moved else [])
            idx = np.unique(np.concatenate([np.arange(max(0, a), min(n, b)) for a, b in spans]))
            # And the suffix's start that was encoded as prefix: it would not read as text after
            # the cursor at all (an edit's staleness there is PIE's, as elsewhere).
            head = np.arange(g, min(n, g + doc.config.fim_window))
            doc.region.mark_dirty(np.union1d(idx[doc.region.stale_tokens()[idx]], head[~self.sided[head]]))
            self.sided[head] = True
        self.seen = doc.region.clock  # what this marked is encoded by settling, before the completion
        st, g = doc.state, self.gap
        e = int(st.ends[g - 1]) if g > 0 else 0
        before, soft = st.text[e:c] + extra, ""
        if before and not before.strip(" \t"):
            # Only indentation between the gap and the cursor: the middle would begin with it, so
            # let the model write it and take it off the answer, rather than force it after
            # <|fim_middle|>, where the model would read it as part of the middle and indent again.
            soft, before = before, ""
        forced = doc.engine.mirror.tokenize(before)[0] if before else np.zeros(0, np.int64)
        text, healed = "", -1
        if heal:
            forced, text, healed = heal_last(doc.engine, forced)
        tail = np.concatenate([[self.middle_id], forced]).astype(np.int64)
        # A token the cursor cuts ("    \n" at an indented empty line) starts the suffix but
        # holds text from before the cursor too; the completion does not look at it.
        cut = g < doc.n and int(st.starts[g]) < c
        return Cursor(g, tail, text, phi=doc.pos0 + doc.n + 1, soft=soft, cut=cut, healed=healed)

    def visible(self, doc, vis, cursor: Cursor) -> None:
        """A completion sees the whole stream: markers, prefix and suffix."""
        for g in (self.prefix_marker, self.suffix_marker):
            vis[g.region.slots()] = True
        vis[doc.region.slots()] = True
        if cursor.cut:
            vis[doc.region.slot0 + self.gap] = False

    def fork(self, doc, uri: str, strategy: str):
        """A copy of the whole stream (markers, text, cache) under uri."""
        kv = doc.engine.new_cache(doc.kv.capacity)
        parts = sorted([self.prefix_marker, doc, self.suffix_marker], key=lambda d: d.region.slot0)
        copies = {id(d): d.copy(uri if d is doc else d.uri, strategy if d is doc else "full", kv, cap=d.region.cap)
                  for d in parts}
        p, d, s = (copies[id(x)] for x in (self.prefix_marker, doc, self.suffix_marker))
        d.attend_to([p])
        s.attend_to([p, _Before(d)])
        d.set_prompt(FimStream(p, s, self.middle_id, self.gap, self.sided.copy()))
        return d

    # -- the gap ----------------------------------------------------------------------------------
    def gap_for(self, doc, c: int) -> int:
        """The token boundary at or before char c (never inside one character's byte tokens)."""
        st = doc.state
        g = int(np.searchsorted(st.ends, c, side="right"))
        while 0 < g < len(st.ids) and st.ends[g - 1] > st.starts[g]:
            g -= 1
        return g

    def move_gap(self, doc, g: int) -> int:
        """Move the suffix marker before token g; returns the keys rotated."""
        old = self.gap
        if g == old:
            return 0
        lo, hi = min(g, old), max(g, old)
        rotated = doc.region.shift(lo, hi, 1 if g < old else -1)  # those that become suffix move one later
        doc.region.mark_stale(np.arange(lo, doc.n))  # they attended with the marker elsewhere
        self.gap = g
        self.sided[:g] = False  # prefix now: when it is suffix again, its K/V may be either side's
        self.suffix_marker.rebase(doc.pos0 + g)
        return rotated
