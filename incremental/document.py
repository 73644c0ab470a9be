"""A live document: its text, its token mirror and its KV cache, updated edit by edit."""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import numpy as np

from . import strategies, update
from .decode import Completion, decode
from .kv_cache import KVCache
from .syntax import SyntaxTree
from .token_mirror import MirrorState
from .typeahead import TypeAhead

PYTHON_SUFFIXES = (".py", ".pyi", ".pyw")

Position = tuple[int, int]
Change = tuple[Position, Position, str]


class Document:
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
        self.kv.alloc(self, self.n + 64)
        self.version = 0
        self.last_keep: np.ndarray | None = None
        self.encode_ms_per_token = 1.0  # an estimate, refined by every encode (for maxPromptMs)
        self.python = uri.lower().endswith(PYTHON_SUFFIXES)
        self._syntax: SyntaxTree | None = None
        self._syntax_stale = False
        self.typeahead = TypeAhead()
        self._stats = dict(edits=0, tokens_encoded_last_edit=0, keys_rotated_last_edit=0, edit_ms_last=0.0,
                           tokens_encoded_total=0, keys_rotated_total=0, completions=0, last_completion={},
                           last_prefetch={}, prompt_caps=0, predict_caps=0)
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

    @property
    def stats(self) -> dict:
        kv, s = self.kv, slice(self.slot0, self.slot0 + self.n)
        return dict(self._stats, uri=self.uri, strategy=self.strategy, tokens=self.n, version=self.version,
                    reuse_hits=self.typeahead.hits, position_base=self.pos0, slot_base=self.slot0,
                    stale_tokens=int(kv.stale[s].sum()), dirty_tokens=int(kv.dirty[s].sum()),
                    cache_bytes=self.n * kv.bytes_per_token(), full_reencode_tokens=self.n,
                    syntax_reparses=self._syntax.reparses if self._syntax is not None else 0)

    def cached(self) -> tuple:
        """Views (L, Hkv, n, D) of this document's cached keys and values, in token order."""
        s = slice(self.slot0, self.slot0 + self.n)
        return self.kv.k[:, :, s], self.kv.v[:, :, s]

    @property
    def positions(self) -> np.ndarray:
        return self.kv.pos[self.slot0: self.slot0 + self.n]

    @property
    def stale(self) -> np.ndarray:
        return self.kv.stale[self.slot0: self.slot0 + self.n]

    @property
    def dirty(self) -> np.ndarray:
        """Which tokens still wait to be encoded (after settle=False edits or an interruption)."""
        return self.kv.dirty[self.slot0: self.slot0 + self.n]

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
        new.kv = self.engine._new_cache(self.n + 64)
        new.kv.alloc(new, self.n + 64)
        new.kv.restore(self.kv.snapshot(self.slot0, self.n), new.slot0)
        self.engine.documents[uri] = new
        return new

    def scratch(self, need: int) -> int:
        """The first of `need` free slots for a completion's own tokens (the target group)."""
        kv = self.kv
        if self.n + need > self.cap and self.slot0 + self.cap == kv.top:
            kv.grow(self, self.n + need)       # the last region: grow it in place
        if self.n + need <= self.cap:
            return self.slot0 + self.n
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
        rotated = update.rearrange(self, p)
        s = self._stats
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

    # -- completing --------------------------------------------------------------------------
    def suggest(self, line: int, col: int, n: int = 1, max_new_tokens: int | None = None,
                should_stop: Callable[[], bool] | None = None, extra: str = "", reuse: bool = False,
                on_piece: Callable[[str], None] | None = None, **caps) -> Completion:
        """Up to n distinct suggestions at (line, col), from one batched decode.

        reuse: answer from the suggestion last shown when the person has been typing it (no
        model call), and remember this one. extra: text taken as typed at the cursor first
        (prefetch). caps: max_prompt_ms, max_predict_ms, multiline (default from the config).
        on_piece(text) streams candidate 0 as it becomes final."""
        c = self.offset(line, col)
        if reuse and not extra and n == 1:
            rest = self.typeahead.lookup(self.text, c)
            if rest is not None:
                comp = Completion(texts=[rest], stop="typed_ahead", reused=True)
                self._stats["last_completion"] = comp.summary()
                if on_piece is not None:
                    on_piece(rest)
                return comp
        gen = self._decode(line, col, n, max_new_tokens, should_stop, extra, **caps)
        while True:
            try:
                piece = next(gen)
            except StopIteration as done:
                comp = done.value
                break
            if on_piece is not None:
                on_piece(piece)
        if reuse and not extra and comp.stop not in ("cancelled", "prompt_cap", "predict_cap"):
            self.typeahead.remember(self.text, c, comp.text)
        return comp

    def prefetch(self, should_stop: Callable[[], bool] | None = None, **caps) -> str | None:
        """Decode the line after the suggestion last shown, as if it had been accepted, and
        append it to that suggestion for typed-ahead reuse. Returns the prefetched text."""
        shown = self.typeahead.shown
        if shown is None or not self.text.startswith(shown.before) or not shown.text.strip():
            return None
        line, col = self.engine.mirror.position(self.state, shown.anchor)
        comp = self.suggest(line, col, extra=shown.text, should_stop=should_stop, record=False, **caps)
        if comp.stop in ("cancelled", "prompt_cap") or not comp.text:
            return None
        return comp.text if self.typeahead.extend(shown.text, comp.text) else None

    def stream(self, line: int, col: int, max_new_tokens: int | None = None,
               should_stop: Callable[[], bool] | None = None, **caps) -> Iterator[str]:
        """Yield the completion at (line, col) piece by piece (one per decoded token at most)."""
        yield from self._decode(line, col, 1, max_new_tokens, should_stop, "", **caps)

    def complete(self, line: int, col: int, max_new_tokens: int | None = None,
                 should_stop: Callable[[], bool] | None = None, **caps) -> str:
        """The text to insert at (line, col): greedy, to the end of the line (or of the block a
        colon just opened)."""
        return self.suggest(line, col, 1, max_new_tokens, should_stop, **caps).text

    def _decode(self, line, col, n, max_new_tokens, should_stop, extra, max_prompt_ms=None,
                max_predict_ms=None, multiline=None, max_lines=None, record=True):
        cfg = self.engine.config
        c = self.offset(line, col)
        max_new = max_new_tokens or cfg.max_new_tokens
        if max_new < 1 or n < 1:
            raise ValueError(f"max_new_tokens and the number of candidates must be at least 1, got {max_new}, {n}")
        comp = yield from decode(
            self, c, n, max_new, should_stop, extra,
            max_prompt_ms=cfg.max_prompt_ms if max_prompt_ms is None else max_prompt_ms,
            max_predict_ms=cfg.max_predict_ms if max_predict_ms is None else max_predict_ms,
            multiline=cfg.multiline if multiline is None else multiline, max_lines=max_lines)
        if record:  # a prefetch is not a completion anybody asked for
            self._stats["completions"] += 1
            self._stats["prompt_caps"] += comp.incomplete
            self._stats["predict_caps"] += comp.capped
            self._stats["last_completion"] = comp.summary()
        else:
            self._stats["last_prefetch"] = comp.summary()
        return comp
