"""The token mirror: the document's text and its token ids, kept equal to a fresh tokenization.

An edit re-tokenizes only a window around it. The window starts a few tokens before the edit and
ends a few tokens after it; it is accepted only when its first tokens and its last tokens agree
with the old tokenization (same ids at the same offsets), which means the tokenizer's pre-token
split has re-synchronised on both sides. Otherwise the window grows (doubling) until it does, or
until it spans the text, which is then simply a full tokenization. Tokenizers that prepend a
marker to every input (SentencePiece's "first" scheme) never re-synchronise on the left and so
degrade to full tokenization, which is correct, only slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lines import line_starts, splice_line_starts, to_offset, to_position

MARGIN = 3  # tokens that must agree on each side of a window


@dataclass(frozen=True)
class Splice:
    """Token ids [start, start + removed) were replaced by `inserted`."""
    start: int
    removed: int
    inserted: tuple[int, ...]


@dataclass(frozen=True)
class MirrorState:
    text: str
    ids: np.ndarray      # (T,) int64
    starts: np.ndarray   # (T,) char offset where each token begins
    ends: np.ndarray     # (T,) char offset where each token ends
    lines: np.ndarray    # char offset where each line begins


class TokenMirror:
    def __init__(self, tokenizer, verify: bool = False):
        self.tok = tokenizer
        self.verify = verify

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return ids, off[:, 0].copy(), off[:, 1].copy()

    def state(self, text: str) -> MirrorState:
        ids, starts, ends = self.tokenize(text)
        return MirrorState(text, ids, starts, ends, line_starts(text))

    def offset(self, st: MirrorState, line: int, col: int, encoding: str = "utf-32", clamp: bool = False) -> int:
        """The char offset of (line, col), col in code units of encoding (lines.py)."""
        return to_offset(st.lines, st.text, line, col, encoding, clamp)

    def position(self, st: MirrorState, offset: int, encoding: str = "utf-32") -> tuple[int, int]:
        return to_position(st.lines, st.text, offset, encoding)

    def apply(self, st: MirrorState, start: tuple[int, int], end: tuple[int, int], text: str,
              encoding: str = "utf-32") -> tuple[MirrorState, Splice]:
        """Replace the range start..end ((line, column) pairs, columns in code units of encoding)
        with text. Pure: `st` is unchanged."""
        if not isinstance(text, str):
            raise ValueError(f"replacement text must be a str, got {type(text).__name__}")
        a = self.offset(st, *start, encoding)
        b = self.offset(st, *end, encoding)
        if b < a:
            raise ValueError(f"range end {tuple(end)} is before its start {tuple(start)}")
        new_text = st.text[:a] + text + st.text[b:]
        lines = splice_line_starts(st.lines, new_text, a, b, len(text))
        ids, starts, ends, splice = self._retokenize(st, new_text, a, b, len(text))
        new = MirrorState(new_text, ids, starts, ends, lines)
        if self.verify:
            self.check(new)
        return new, splice

    def _retokenize(self, st: MirrorState, new_text: str, a: int, b: int, n_ins: int):
        T, delta = len(st.ids), n_ins - (b - a)
        first = int(np.searchsorted(st.ends, a, side="right"))  # first token not wholly before a
        last = int(np.searchsorted(st.starts, b, side="left"))  # first token wholly at/after b
        span = MARGIN
        while True:
            i0 = max(0, first - span)
            j1 = min(T, last + span)  # old tokens [j1, j1 + MARGIN) must re-appear after the window
            x0 = int(st.starts[i0]) if i0 < T else 0
            if i0 == 0:
                x0 = 0
            if j1 + MARGIN >= T:
                j1 = right_end = T  # the window runs to the end of the text
            else:
                right_end = j1 + MARGIN
            y_old = len(st.text) if right_end == T else int(st.starts[right_end])
            w_ids, w_starts, w_ends = self.tokenize(new_text[x0: y_old + delta])
            w_starts, w_ends = w_starts + x0, w_ends + x0
            ok_left = i0 == 0 or (
                len(w_ids) >= MARGIN and np.array_equal(w_ids[:MARGIN], st.ids[i0: i0 + MARGIN])
                and np.array_equal(w_starts[:MARGIN], st.starts[i0: i0 + MARGIN]))
            if right_end == T:
                ok_right, cut = True, len(w_ids)
            else:
                tail_ids = st.ids[j1: right_end]
                tail_starts = st.starts[j1: right_end] + delta
                k = len(tail_ids)
                ok_right = (len(w_ids) >= k and np.array_equal(w_ids[-k:], tail_ids)
                            and np.array_equal(w_starts[-k:], tail_starts))
                cut = len(w_ids) - k
            if ok_left and ok_right:
                break
            if i0 == 0 and right_end == T:
                break  # a full tokenization, which is right by definition
            span *= 2
        # window tokens [0, cut) replace old tokens [i0, j1)
        new_ids = np.concatenate([st.ids[:i0], w_ids[:cut], st.ids[j1:]])
        new_starts = np.concatenate([st.starts[:i0], w_starts[:cut], st.starts[j1:] + delta])
        new_ends = np.concatenate([st.ends[:i0], w_ends[:cut], st.ends[j1:] + delta])
        old_mid, new_mid = st.ids[i0:j1], w_ids[:cut]
        p = _common_prefix(old_mid, new_mid)
        s = _common_prefix(old_mid[p:][::-1], new_mid[p:][::-1])
        splice = Splice(i0 + p, len(old_mid) - p - s, tuple(int(t) for t in new_mid[p: len(new_mid) - s]))
        return new_ids, new_starts, new_ends, splice

    def check(self, st: MirrorState) -> None:
        """Assert the mirror equals a fresh tokenization (the invariant); for tests and debugging."""
        ids, _, _ = self.tokenize(st.text)
        if not np.array_equal(ids, st.ids):
            i = _common_prefix(ids, st.ids)
            raise AssertionError(f"token mirror diverged at token {i}: mirror {st.ids[i:i + 5].tolist()} "
                                 f"vs fresh {ids[i:i + 5].tolist()} near {st.text[max(0, int(st.starts[min(i, len(st.starts) - 1)]) - 20):][:60]!r}")


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    neq = np.flatnonzero(a[:n] != b[:n])
    return int(neq[0]) if len(neq) else n
