"""A live document: its text, its token mirror and its cache region, updated edit by edit.

A document is also a position group: its tokens are encoded from pos0, and it attends to the
groups in `sees` (a shared prefix, context files: groups.py). Its prompt layout (`prompt`, a
PrefixPrompt or a FimStream) says where each token is encoded and what a completion reads.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from . import batch, blend, encode, strategies
from .attention import LAZY_COMPACT_TOKENS
from .completer import Completer
from .group import PositionGroup
from .kv_cache import KVCache, slack
from .syntax import SyntaxTree
from .token_mirror import MirrorState
from .typeahead import TypeAhead

PYTHON_SUFFIXES = (".py", ".pyi", ".pyw")

Position = tuple[int, int]
Change = tuple[Position, Position, str]


class Document(PositionGroup, Completer):
    """One open file. Create it with Engine.open; every method runs on the caller's thread."""

    def __init__(self, engine, uri: str, text: str, strategy: str, kv: KVCache | None = None,
                 pos0: int = 0, sees: Sequence = ()):
        """A document encoded from position pos0, attending to the groups `sees` before it (the
        shared prefix, context files); kv is shared with them, or a private cache when None."""
        self.engine, self.uri, self.strategy = engine, uri, strategy
        self.state: MirrorState = engine.mirror.state(text)
        super().__init__(kv if kv is not None else engine.new_cache(256), pos0, sees, len(self.state.ids))
        self.version = 0
        self._edit_t0 = 0.0  # when the last edit began
        self.last_keep: np.ndarray | None = None  # for tests and tools: the old index of each token
        self.encode_ms_per_token = 1.0  # an estimate, refined by every encode (for maxPromptMs)
        self.python = uri.lower().endswith(PYTHON_SUFFIXES)
        self._syntax: SyntaxTree | None = None
        self._syntax_stale = False
        self.typeahead = TypeAhead()
        self.overrides: dict = {}  # Config fields this document sets apart from its engine's
        self._stats = dict(edits=0, tokens_encoded_last_edit=0, keys_rotated_last_edit=0, edit_ms_last=0.0,
                           rearrange_ms_last=0.0, tokens_encoded_total=0, keys_rotated_total=0, completions=0,
                           last_completion={}, last_prefetch={}, prompt_caps=0, predict_caps=0, heal_drafts=0,
                           repaired_last_edit=0, repaired_total=0, tokens_new_last_edit=0,
                           repaired_share_last_edit=0.0)

    # -- reading -----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return self.state.text

    @property
    def token_ids(self) -> list[int]:
        return self.state.ids.tolist()

    @property
    def stats(self) -> dict:
        r = self.region
        return dict(self._stats, uri=self.uri, strategy=self.strategy, tokens=self.n, version=self.version,
                    reuse_hits=self.typeahead.hits, position_base=self.pos0, slot_base=r.slot0,
                    stale_tokens=int(r.stale_tokens().sum()), dirty_tokens=int(r.dirty_tokens().sum()),
                    pending_keys=int(np.count_nonzero(r.delta[r.local()])), pending_segments=r.segments(), holes=r.used - r.n,
                    compactions=r.compactions, cache_bytes=r.n * self.kv.bytes_per_token(), full_reencode_tokens=self.n,
                    syntax_reparses=self._syntax.reparses if self._syntax is not None else 0)

    def offset(self, line: int, col: int, encoding: str = "utf-32", clamp: bool = False) -> int:
        """(line, col) -> char offset; clamp: a col past the line's end is its end (lines.to_offset)."""
        return self.engine.mirror.offset(self.state, line, col, encoding, clamp)

    def position(self, offset: int, encoding: str = "utf-32") -> tuple[int, int]:
        return self.engine.mirror.position(self.state, offset, encoding)

    # -- memory ------------------------------------------------------------------------------
    def fork(self, uri: str, strategy: str | None = None) -> "Document":
        """An independent copy (text, tokens and cache, in a private cache) registered under uri,
        e.g. to compare strategies from one encoded state without encoding it again."""
        new = self.prompt.fork(self, uri, strategies.check(self.strategy if strategy is None else strategy))
        self.engine.documents[uri] = new
        return new

    def copy(self, uri: str, strategy: str, kv: KVCache | None = None, cap: int | None = None) -> "Document":
        """This group copied into kv (a new private cache when None), not registered anywhere."""
        r = self.region
        if kv is None:
            kv = self.engine.new_cache(r.used + slack(r.used))
        new = Document.__new__(Document)
        new.__dict__.update(self.__dict__)
        new.uri, new.strategy, new.kv, new.sees = uri, strategy, kv, list(self.sees)
        new.region = r.fork(kv, cap)
        new.users = 0
        new._syntax, new._syntax_stale, new.typeahead = None, False, TypeAhead()
        new._stats = dict(self._stats)
        return new

    @property
    def config(self):
        """The engine's Config, with this document's overrides (configure) applied."""
        cfg = self.engine.config
        return cfg.updated(**self.overrides) if self.overrides else cfg

    def configure(self, **overrides) -> None:
        """Settings of this document's own (say blend_cap, for a benchmark's sweep); validated. A
        precision's weight formats are made now, not in its first pass."""
        self.engine.config.updated(**overrides)
        self.overrides = dict(overrides)
        if "precision" in overrides:
            self.engine.model.precision.prepare(overrides["precision"])

    # -- editing -----------------------------------------------------------------------------
    def edit(self, start: Position, end: Position, text: str, **kw) -> dict:
        """Replace start..end ((line, column), columns in code points) with text."""
        return self.edit_batch([(start, end, text)], **kw)

    def edit_batch(self, changes: Sequence[Change], settle: bool = True,
                   should_stop: Callable[[], bool] | None = None, encoding: str = "utf-32") -> dict:
        """Apply changes in order, as one batch: each cached key is rotated at most once. Each
        change's positions refer to the text the changes before it left; columns count code
        units of `encoding` (code points by default).

        Raises ValueError (leaving text, tokens and cache untouched) when any change is invalid.
        With settle=False the new tokens are only marked for encoding; `settle` encodes them.
        """
        t0 = self._edit_t0 = time.perf_counter()
        mirror, st = self.engine.mirror, self.state
        origin = np.arange(len(st.ids), dtype=np.int64)
        spans = []  # (a, b, text) char offsets, for the syntax tree
        for i, ch in enumerate(changes):
            try:
                start, end, text = ch
                before = st
                st, sp = mirror.apply(st, tuple(start), tuple(end), text, encoding)
                spans.append((mirror.offset(before, *start, encoding), mirror.offset(before, *end, encoding), text))
            except ValueError as e:
                raise ValueError(f"change {i + 1} of {len(changes)}: {e}; the document was left unchanged") from None
            except (TypeError, IndexError) as e:
                raise ValueError(f"change {i + 1} of {len(changes)} is malformed ({e}): expected "
                                 "((line, column), (line, column), text); the document was left unchanged") from None
            origin = np.concatenate([origin[: sp.start], np.full(len(sp.inserted), -1, dtype=np.int64),
                                     origin[sp.start + sp.removed:]])
        cfg = self.config
        p = strategies.plan(self.strategy, self.state.ids, st.ids, origin, cfg.reuse_min_chunk, cfg.refresh_window)
        self.state = st
        self.version += 1
        if self._syntax is not None:
            for a, b, text in spans:
                self._syntax.edit(a, b, text)
            self._syntax_stale = True
        t1 = time.perf_counter()
        rotated = self._rearrange(p)
        s = self._stats
        s["rearrange_ms_last"] = (time.perf_counter() - t1) * 1e3
        s["edits"] += 1
        s["keys_rotated_last_edit"] = rotated
        s["keys_rotated_total"] += rotated
        s["tokens_encoded_last_edit"], s["tokens_new_last_edit"] = 0, int((origin < 0).sum())
        if self.strategy == "pie-blend":
            stale = int(self.stale.sum())
            s["repaired_last_edit"] = blend.repair_edit(self, p.keep)
            s["repaired_share_last_edit"] = s["repaired_last_edit"] / stale if stale else 0.0
            s["repaired_total"] += s["repaired_last_edit"]
        if settle:
            self.prompt.settle(self, should_stop)
        s["edit_ms_last"] = (time.perf_counter() - t0) * 1e3
        return self.stats

    def _rearrange(self, p: strategies.Plan) -> int:
        """Carry out the plan on the region; returns the keys rotated."""
        self.last_keep = p.keep
        r, positions = self.region, lambda: self.position_of(np.arange(len(p.keep)))
        if self.strategy == "lazy" and self.prompt.lazy:
            return r.splice_lazy(p.keep, positions(), self.config.lazy_segments)
        rotated = r.compact()  # a fork of a lazy document, or a FIM stream: token order first
        self.prompt.before_splice(self, p.keep)
        return rotated + r.splice(p.keep, positions(), p.rotate)

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
        return self.edit(self.position(p), self.position(len(old) - s), text[p: len(text) - s], **kw)

    def settle(self, should_stop: Callable[[], bool] | None = None, upto: int | None = None,
               progress: Callable[[int, int], None] | None = None, rider: encode.Rider | None = None) -> bool:
        """Encode dirty tokens (before index `upto`, default all), left to right, in chunks.
        progress(done, total) after each chunk; False when should_stop() interrupted it (the
        rest stays dirty for the next edit or completion). rider: a completion's tail to run
        in the last chunk's pass (encode.Rider)."""
        return batch.alone(self.engine.model, self.settling(should_stop, upto, progress, rider))

    def settling(self, should_stop: Callable[[], bool] | None = None, upto: int | None = None,
                 progress: Callable[[int, int], None] | None = None, rider: encode.Rider | None = None,
                 edit: bool = False):
        """settle as a stepper (batch.py): each chunk's forward pass is yielded, for a scheduler
        to run with other documents' passes. edit: this encode finishes the last edit (made with
        settle=False), whose wall time (edit_ms_last) it ends."""
        T = self.n if upto is None else min(upto, self.n)
        total, done = int(self.region.dirty_tokens()[:T].sum()), 0
        s = self._stats
        if self.region.order is not None and total >= LAZY_COMPACT_TOKENS:
            # a paste under lazy: one real rotation now, then plain attention, beats per-run scoring
            rotated = self.region.compact()
            s["keys_rotated_last_edit"] += rotated
            s["keys_rotated_total"] += rotated

        def chunk(k: int, ms_per_token: float | None) -> None:
            nonlocal done
            done += k
            s["tokens_encoded_last_edit"] += k
            s["tokens_encoded_total"] += k
            if ms_per_token is not None:  # small runs are dominated by reading the weights once
                self.encode_ms_per_token = 0.5 * self.encode_ms_per_token + 0.5 * ms_per_token
            if progress is not None:
                progress(done, total)
        done_all = yield from encode.settling(self, T, should_stop, chunk, rider)
        if edit:
            s["edit_ms_last"] = (time.perf_counter() - self._edit_t0) * 1e3
        return done_all

    def refresh(self, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None,
                ranked: bool = False) -> int:
        """Re-encode the stalest region (from the first stale token on), up to max_tokens; ranked:
        the stale tokens blend_rule ranks highest first, none of them twice between edits.
        Returns how many tokens were re-encoded."""
        if ranked:
            return encode.recompute(self, blend.ranked(self, max_tokens or self.n), should_stop)
        return encode.refresh(self, max_tokens, should_stop)

    def before_completion(self, j: int) -> None:
        """A completion will read tokens [0, j): pie-blend recomputes the stale ones nearest it."""
        if self.strategy == "pie-blend":
            n = blend.repair_cursor(self, j)
            self._stats["repaired_total"] += n

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
        line, col = self.position(c)
        tree = self.syntax_tree()
        node = tree.node_before(c) if tree is not None and col > 0 else None
        while node is not None and node.parent is not None and node.parent.type not in ("block", "module"):
            node = node.parent
        if node is None or node.type in ("block", "module"):
            return c - col
        start = len(self.state.text.encode("utf-8")[: node.start_byte].decode("utf-8", errors="ignore"))
        return min(start, c - col)
