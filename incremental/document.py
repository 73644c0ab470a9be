"""A live document: its text, its token mirror and its KV cache, updated edit by edit."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from . import lazy, strategies, update
from .completer import Completer
from .kv_cache import KVCache
from .syntax import SyntaxTree
from .token_mirror import MirrorState
from .typeahead import TypeAhead

PYTHON_SUFFIXES = (".py", ".pyi", ".pyw")

Position = tuple[int, int]
Change = tuple[Position, Position, str]


def slack(n: int) -> int:
    """Free slots a region gets beyond its n tokens: room for edits and a completion's tokens,
    so that typing does not regrow (copy) a whole cache on its first insertion."""
    return 64 + n // 8


class Document(Completer):
    """One open file. Create it with Engine.open; every method runs on the caller's thread."""

    def __init__(self, engine, uri: str, text: str, strategy: str, kv: KVCache | None = None,
                 pos0: int = 0, sees: Sequence["Document"] = ()):
        """A document encoded from position pos0, attending to the groups `sees` before it (the
        shared prefix, context files); kv is shared with them, or a private cache when None."""
        self.engine, self.uri, self.strategy = engine, uri, strategy
        self.kv = kv if kv is not None else engine._new_cache(256)
        self.pos0, self.sees = pos0, list(sees)
        # FIM: tokens from index `gap` on are the suffix; they sit one position later, after the
        # suffix marker, and also attend to the groups in `after_gap` (the marker).
        self.gap: int | None = None
        self.after_gap: list = []
        self.fim = None
        self.state: MirrorState = engine.mirror.state(text)
        self.n = len(self.state.ids)
        self.slot0 = self.cap = 0
        # Token i's K/V sit at slot slot0 + i, or at slot0 + order[i] while a lazy layout is live;
        # `used` region slots hold tokens or the holes deleted ones left.
        self.order: np.ndarray | None = None
        self.used = self.n
        self.kv.alloc(self, self.n + slack(self.n))
        self.version = 0
        self.last_keep: np.ndarray | None = None
        self.encode_ms_per_token = 1.0  # an estimate, refined by every encode (for maxPromptMs)
        self.python = uri.lower().endswith(PYTHON_SUFFIXES)
        self._syntax: SyntaxTree | None = None
        self._syntax_stale = False
        self.typeahead = TypeAhead()
        self._stats = dict(edits=0, tokens_encoded_last_edit=0, keys_rotated_last_edit=0, edit_ms_last=0.0,
                           rearrange_ms_last=0.0,
                           tokens_encoded_total=0, keys_rotated_total=0, completions=0, last_completion={},
                           last_prefetch={}, prompt_caps=0, predict_caps=0, compactions=0)
        s0, T = self.slot0, self.n
        self.kv.pos[s0: s0 + T] = self.position_of(np.arange(T))
        self.kv.stale[s0: s0 + T] = False
        self.kv.dirty[s0: s0 + T] = True

    # -- reading -----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return self.state.text

    @property
    def token_ids(self) -> list[int]:
        return self.state.ids.tolist()

    def index(self, idx: np.ndarray | None = None):
        """The slots of token indices idx (all tokens when None); a slice when that is a view."""
        if self.order is None:
            return slice(self.slot0, self.slot0 + self.n) if idx is None else self.slot0 + idx
        return self.slot0 + (self.order if idx is None else self.order[idx])

    def span(self, j: int):
        """The slots of tokens [0, j), in token order."""
        return slice(self.slot0, self.slot0 + j) if self.order is None else self.slot0 + self.order[:j]

    @property
    def stats(self) -> dict:
        kv, s = self.kv, self.index()
        return dict(self._stats, uri=self.uri, strategy=self.strategy, tokens=self.n, version=self.version,
                    reuse_hits=self.typeahead.hits, position_base=self.pos0, slot_base=self.slot0,
                    stale_tokens=int(kv.stale[s].sum()), dirty_tokens=int(kv.dirty[s].sum()),
                    pending_keys=int(np.count_nonzero(kv.delta[s])), pending_segments=lazy.segments(self),
                    holes=self.used - self.n,
                    cache_bytes=self.n * kv.bytes_per_token(), full_reencode_tokens=self.n,
                    syntax_reparses=self._syntax.reparses if self._syntax is not None else 0)

    def cached(self) -> tuple:
        """Views (L, Hkv, n, D) of this document's cached keys and values, in token order, each
        key rotated to its position (a lazy layout is compacted first)."""
        self.compact()
        s = slice(self.slot0, self.slot0 + self.n)
        return self.kv.k[:, :, s], self.kv.v[:, :, s]

    def compact(self) -> int:
        """Apply a lazy layout's pending deltas for real; returns the keys rotated."""
        return lazy.compact(self)

    @property
    def positions(self) -> np.ndarray:
        """The position of each token's key (pending lazy deltas included)."""
        s = self.index()
        return self.kv.pos[s] + self.kv.delta[s]

    @property
    def stale(self) -> np.ndarray:
        """Which tokens' K/V did not see the current text before them (a copy under a lazy
        layout: change it with mark_stale)."""
        return self.kv.stale[self.index()]

    @property
    def dirty(self) -> np.ndarray:
        """Which tokens still wait to be encoded (after settle=False edits or an interruption)."""
        return self.kv.dirty[self.index()]

    def mark_stale(self, which: np.ndarray | None = None) -> None:
        """Mark tokens stale (all when which is None; else a bool mask over tokens)."""
        if which is None:
            self.kv.stale[self.index()] = True
        else:
            self.kv.stale[self.index(np.flatnonzero(which))] = True

    def position_of(self, idx: np.ndarray) -> np.ndarray:
        """The position token index idx is encoded at: pos0 + idx, one later after a FIM gap."""
        if self.gap is None:
            return self.pos0 + idx
        return self.pos0 + idx + (idx >= self.gap)

    def on_prefix_changed(self) -> None:
        """Text before the FIM gap changed: the suffix marker must be encoded again."""
        if self.fim is not None:
            self.fim.marker_dirty = True
            self.fim.suffix_marker.pos0 = self.pos0 + self.gap

    def offset(self, line: int, col: int) -> int:
        return self.engine.mirror.offset(self.state, line, col)

    def fork(self, uri: str, strategy: str | None = None) -> "Document":
        """An independent copy (text, tokens and cache, in a private cache) registered under uri,
        e.g. to compare strategies from one encoded state without encoding it again."""
        if self.fim is not None:
            new = self.fim.fork(uri, strategy or self.strategy)
            self.engine.documents[uri] = new
            return new
        new = Document.__new__(Document)
        new.__dict__.update(self.__dict__)
        new.uri, new.strategy = uri, strategy or self.strategy
        new._syntax, new._syntax_stale, new.typeahead = None, False, TypeAhead()
        new._stats = dict(self._stats)
        new.kv = self.engine._new_cache(self.used + slack(self.used))
        new.kv.alloc(new, self.used + slack(self.used))
        new.kv.restore(self.kv.snapshot(self.slot0, self.used), new.slot0)
        self.engine.documents[uri] = new
        return new

    def scratch(self, need: int) -> int:
        """The first of `need` free slots for a completion's own tokens (the target group)."""
        kv = self.kv
        if self.used + need > self.cap and self.slot0 + self.cap == kv.top:
            kv.grow(self, self.used + need)    # the last region: grow it in place
        if self.used + need <= self.cap:
            return self.slot0 + self.used
        kv.reserve(kv.top + need)              # else past every region
        return kv.top

    def close(self) -> None:
        """Give the cache region back (the engine forgets the document too)."""
        self.kv.free(self)

    # -- editing -----------------------------------------------------------------------------
    def edit(self, start: Position, end: Position, text: str, **kw) -> dict:
        """Replace start..end ((line, column), columns in code points) with text."""
        return self.edit_batch([(start, end, text)], **kw)

    def edit_batch(self, changes: Sequence[Change], settle: bool = True,
                   should_stop: Callable[[], bool] | None = None) -> dict:
        """Apply changes in order, as one batch: each cached key is rotated at most once.

        Raises ValueError (leaving text, tokens and cache untouched) when any change is invalid.
        With settle=False the new tokens are only marked for encoding; `settle` encodes them.
        """
        t0 = time.perf_counter()
        mirror, st = self.engine.mirror, self.state
        origin = np.arange(len(st.ids), dtype=np.int64)
        spans = []  # (a, b, text) char offsets, for the syntax tree
        for i, ch in enumerate(changes):
            try:
                start, end, text = ch
                before = st
                st, sp = mirror.apply(st, tuple(start), tuple(end), text)
                spans.append((mirror.offset(before, *start), mirror.offset(before, *end), text))
            except ValueError as e:
                raise ValueError(f"change {i + 1} of {len(changes)}: {e}; the document was left unchanged") from None
            except (TypeError, IndexError) as e:
                raise ValueError(f"change {i + 1} of {len(changes)} is malformed ({e}): expected "
                                 "((line, column), (line, column), text); the document was left unchanged") from None
            origin = np.concatenate([origin[: sp.start], np.full(len(sp.inserted), -1, dtype=np.int64),
                                     origin[sp.start + sp.removed:]])
        old_ids = self.state.ids
        cfg = self.engine.config
        p = strategies.plan(self.strategy, old_ids, st.ids, origin, cfg.reuse_min_chunk, cfg.refresh_window)
        self.state = st
        self.version += 1
        if self._syntax is not None:
            for a, b, text in spans:
                self._syntax.edit(a, b, text)
            self._syntax_stale = True
        t1 = time.perf_counter()
        rotated = update.rearrange(self, p)
        s = self._stats
        s["rearrange_ms_last"] = (time.perf_counter() - t1) * 1e3
        s["edits"] += 1
        s["keys_rotated_last_edit"] = rotated
        s["keys_rotated_total"] += rotated
        s["tokens_encoded_last_edit"] = 0
        if settle:
            self.settle(should_stop)
        s["edit_ms_last"] = (time.perf_counter() - t0) * 1e3
        return self.stats

    def set_text(self, text: str, **kw) -> dict:
        """Replace the whole text (an LSP full-document change) as one minimal splice."""
        old = self.state.text
        n = min(len(old), len(text))
        p = 0
        while p < n and old[p] == text[p]:
            p += 1
        s = 0
        while s < n - p and old[len(old) - 1 - s] == text[len(text) - 1 - s]:
            s += 1
        # never split a CRLF pair: LSP positions cannot name the spot between \r and \n
        if 0 < p < len(old) and old[p - 1] == "\r" and old[p] == "\n":
            p -= 1
        while s and 0 < len(old) - s < len(old) and old[len(old) - s - 1] == "\r" and old[len(old) - s] == "\n":
            s -= 1
        to_pos = self.engine.mirror.position
        start, end = to_pos(self.state, p), to_pos(self.state, len(old) - s)
        return self.edit(start, end, text[p: len(text) - s], **kw)

    def settle(self, should_stop: Callable[[], bool] | None = None, upto: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> bool:
        """Encode dirty tokens (before index `upto`, default all), left to right, in chunks.
        progress(done, total) after each chunk; False when should_stop() interrupted it (the
        rest stays dirty for the next edit or completion)."""
        return update.settle(self, should_stop, upto, progress)

    def refresh(self, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        """Re-encode the stalest region (from the first stale token on), up to max_tokens.
        Returns how many tokens were re-encoded."""
        return update.refresh(self, max_tokens, should_stop)

    # -- syntax ------------------------------------------------------------------------------
    def syntax_tree(self) -> SyntaxTree | None:
        """The tree-sitter tree of a Python document, reparsed incrementally after edits."""
        if not self.python:
            return None
        if self._syntax is None:
            try:
                self._syntax = SyntaxTree(self.text)
            except ImportError:
                self.python = False
                return None
        elif self._syntax_stale:
            self._syntax.reparse()
        self._syntax_stale = False
        return self._syntax

    def statement_start(self, c: int) -> int:
        """Where the statement holding the cursor starts (to know which brackets are open)."""
        line, col = self.engine.mirror.position(self.state, c)
        tree = self.syntax_tree()
        node = tree.node_before(c) if tree is not None and col > 0 else None
        while node is not None and node.parent is not None and node.parent.type not in ("block", "module"):
            node = node.parent
        if node is None or node.type in ("block", "module"):
            return c - col
        start = len(self.state.text.encode("utf-8")[: node.start_byte].decode("utf-8", errors="ignore"))
        return min(start, c - col)
