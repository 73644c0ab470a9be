"""FIM as a token stream: the PSM prompt of a document kept as one live cache.

    <|fim_prefix|> doc[:g] <|fim_suffix|> doc[g:] <|fim_middle|> ...middle...

The document's tokens stay in their region in text order; the two markers are one-token groups
beside them. The suffix tokens (index >= g, the gap) sit one position later, after the suffix
marker, and attend to it. Moving the cursor moves the gap: the tokens between the old and the new
gap change side and shift by one position, which is a PIE rotation, and the suffix marker is
encoded again (one token), instead of rebuilding the prompt. `<|fim_middle|>` is the first token
of every completion's tail. Models without these tokens keep masked prefix decoding (decode.py).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from livekv import kernels

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def fim_ids(tokenizer) -> tuple[int, int, int] | None:
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(t) for t in FIM_TOKENS]
    return None if any(i is None for i in ids) else tuple(ids)


class _Before:
    """The part of a document before its gap, as a group others can attend to."""

    def __init__(self, doc):
        self._doc = weakref.ref(doc)  # weak: no cycle keeps a closed document's cache alive

    @property
    def doc(self):
        return self._doc()

    @property
    def slot0(self) -> int:
        return self.doc.slot0

    @property
    def n(self) -> int:
        return self.doc.gap

    used = n

    def index(self):
        return slice(self.slot0, self.slot0 + self.n)


class FimStream:
    """The markers and the gap of one document's FIM stream."""

    def __init__(self, doc, prefix_marker, suffix_marker, middle_id: int):
        self._doc = weakref.ref(doc)  # the document owns its stream, not the other way round
        self.prefix_marker, self.suffix_marker, self.middle_id = prefix_marker, suffix_marker, middle_id
        self.marker_dirty = True
        self.gap_moves = 0
        self.cut = False
        self.soft = ""

    @property
    def doc(self):
        return self._doc()

    @classmethod
    def open(cls, engine, uri: str, text: str, strategy: str, gap_at: int | None = None):
        """A FIM document: its cache holds the prefix marker, the text, and the suffix marker.
        gap_at (a char offset) places the gap before encoding: a fresh PSM prompt, the rebuild."""
        from .document import Document
        pre, suf, mid = fim_ids(engine.tokenizer)
        kv = engine._new_cache(256)
        p = Document(engine, uri + "#fim-prefix", FIM_TOKENS[0], "full", kv=kv, pos0=0)
        doc = Document(engine, uri, text, strategy, kv=kv, pos0=1, sees=[p])
        s = Document(engine, uri + "#fim-suffix", FIM_TOKENS[1], "full", kv=kv, pos0=1 + doc.n, sees=[p, _Before(doc)])
        assert p.token_ids == [pre] and s.token_ids == [suf], "FIM markers must tokenize as single tokens"
        doc.fim = cls(doc, p, s, mid)
        doc.gap, doc.after_gap = doc.n, [s]
        p.settle()
        if gap_at is not None:
            doc.fim.move_gap(doc.fim.gap_for(gap_at))
            doc.settle(upto=doc.gap)
            doc.fim.settle_marker()
        doc.settle()
        return doc

    def fork(self, uri: str, strategy: str):
        """A copy of the whole stream (markers, text, cache) under uri."""
        from .typeahead import TypeAhead
        doc, kv = self.doc, self.doc.kv
        new_kv = doc.engine._new_cache(kv.capacity)
        new_kv.top = kv.top
        new_kv.k[:, :, :kv.top], new_kv.v[:, :, :kv.top] = kv.k[:, :, :kv.top], kv.v[:, :, :kv.top]
        for name in ("pos", "stale", "dirty", "delta"):
            getattr(new_kv, name)[:kv.top] = getattr(kv, name)[:kv.top]
        p, d, s = (type(x).__new__(type(x)) for x in (self.prefix_marker, doc, self.suffix_marker))
        for new, old in ((p, self.prefix_marker), (d, doc), (s, self.suffix_marker)):
            new.__dict__.update(old.__dict__)
            new.kv = new_kv
            new_kv.regions[id(new)] = [weakref.ref(new, new_kv._forget(id(new))), old.slot0, old.cap]
        d.uri, d.strategy, d.sees, d.after_gap = uri, strategy, [p], [s]
        d._stats, d._syntax, d._syntax_stale, d.typeahead = dict(doc._stats), None, False, TypeAhead()
        s.sees = [p, _Before(d)]
        d.fim = FimStream(d, p, s, self.middle_id)
        d.fim.marker_dirty = self.marker_dirty
        return d

    def gap_for(self, c: int) -> int:
        """The token boundary at or before char c (never inside one character's byte tokens)."""
        st = self.doc.state
        g = int(np.searchsorted(st.ends, c, side="right"))
        while 0 < g < len(st.ids) and st.ends[g - 1] > st.starts[g]:
            g -= 1
        return g

    def move_gap(self, g: int) -> int:
        """Move the suffix marker before token g; returns the keys rotated."""
        doc, kv = self.doc, self.doc.kv
        old = doc.gap
        if g == old:
            return 0
        lo, hi = min(g, old), max(g, old)
        delta = 1 if g < old else -1  # tokens that become suffix move one later, and back
        s = slice(doc.slot0 + lo, doc.slot0 + hi)
        dev = kv.k.device
        kernels.rerotate_keys_(kv.k[:, :, s], torch.full((hi - lo,), delta, device=dev),
                               doc.engine.model.inv_freq.to(dev), positions=torch.from_numpy(kv.pos[s].copy()).to(dev))
        kv.pos[s] += delta
        kv.stale[doc.slot0 + lo: doc.slot0 + doc.n] = True  # they attended with the marker elsewhere
        doc.gap = g
        self.suffix_marker.pos0 = doc.pos0 + g
        self.marker_dirty = True
        self.gap_moves += 1
        return hi - lo

    def settle_marker(self) -> None:
        if self.marker_dirty:
            m = self.suffix_marker
            m.kv.dirty[m.slot0] = True
            m.kv.pos[m.slot0] = m.pos0
            m.settle()
            self.marker_dirty = False

    def prepare(self, c: int, extra: str, heal_ok: bool) -> tuple[np.ndarray, str]:
        """Bring the stream to cursor c; returns (tail ids, healed text) for decoding: the middle
        marker, then the text from the gap to the cursor (and `extra`), its last token healed."""
        doc = self.doc
        if self.move_gap(self.gap_for(c)):
            # the suffix right after the marker is what a middle must join up with: refresh it
            w = doc.engine.config.refresh_window
            doc.dirty[doc.gap: doc.gap + w] |= doc.stale[doc.gap: doc.gap + w]
        doc.settle(upto=doc.gap)
        self.settle_marker()
        doc.settle()
        st = doc.state
        e = int(st.ends[doc.gap - 1]) if doc.gap > 0 else 0
        # A token the cursor cuts ("    \n" at an indented empty line) starts the suffix but
        # holds text from before the cursor too; the completion does not look at it (see visible).
        self.cut = doc.gap < doc.n and int(st.starts[doc.gap]) < c
        before = st.text[e:c] + extra
        self.soft = ""
        if before and not before.strip(" \t"):
            # Only indentation between the gap and the cursor: the middle would begin with it, so
            # let the model write it and take it off the answer, rather than force it after
            # <|fim_middle|>, where the model would read it as part of the middle and indent again.
            self.soft, before = before, ""
        forced = doc.engine.mirror.tokenize(before)[0] if before else np.zeros(0, np.int64)
        heal = ""
        if heal_ok and len(forced):
            heal = doc.engine.token_text(int(forced[-1]))
            if "\ufffd" in heal:
                heal = ""
            else:
                forced = forced[:-1]
        return np.concatenate([[self.middle_id], forced]).astype(np.int64), heal

    def visible(self, vis: torch.Tensor) -> None:
        """Mark what a completion sees: the whole stream (markers, prefix and suffix)."""
        doc = self.doc
        for g in (self.prefix_marker, self.suffix_marker):
            vis[g.slot0: g.slot0 + g.n] = True
        vis[doc.slot0: doc.slot0 + doc.n] = True
        if self.cut:
            vis[doc.slot0 + doc.gap] = False

    def end_position(self) -> int:
        """After the last suffix token: where <|fim_middle|> goes."""
        return self.doc.pos0 + self.doc.n + 1
