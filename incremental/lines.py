"""Line starts of a text, kept up to date by splices, for (line, column) <-> offset.

Lines end at "\n", "\r\n" or "\r", as in LSP (not str.splitlines, which also splits at form feeds
and Unicode separators). Columns are code points of the line, i.e. Python str indices.
"""
from __future__ import annotations

import re

import numpy as np

_BREAK = re.compile(r"\r\n|\r|\n")


def line_starts(text: str) -> np.ndarray:
    return np.array([0] + [m.end() for m in _BREAK.finditer(text)], dtype=np.int64)


def _starts_between(text: str, lo: int, hi: int) -> list[int]:
    # A line starts at p when text[p-1] ends a break: "\n", or "\r" not followed by "\n".
    out = []
    for i in range(lo, min(hi, len(text))):
        c = text[i]
        if c == "\n" or (c == "\r" and (i + 1 >= len(text) or text[i + 1] != "\n")):
            out.append(i + 1)
    return out


def splice_line_starts(starts: np.ndarray, new_text: str, a: int, b: int, n_ins: int) -> np.ndarray:
    """Line starts of new_text = old[:a] + ins + old[b:], from the old text's starts.

    Whether p starts a line depends only on chars p-1 and p, so starts at or before a-1 and after
    b+1 survive (the latter shifted); only the edited neighbourhood is rescanned.
    """
    lo = max(0, a - 1)
    hi = a + n_ins + 1  # new coordinates of old b + 1
    delta = n_ins - (b - a)
    keep_left = starts[: np.searchsorted(starts, lo, side="right")]
    keep_right = starts[np.searchsorted(starts, b + 1, side="right"):] + delta
    mid = np.array(_starts_between(new_text, lo, hi), dtype=np.int64)
    return np.concatenate([keep_left, mid, keep_right])


def to_offset(starts: np.ndarray, text: str, line: int, col: int) -> int:
    """Offset of (line, col); ValueError saying what is out of range."""
    n = len(starts)
    if not (0 <= line < n):
        raise ValueError(f"line {line} is outside the document (it has {n} lines, 0..{n - 1})")
    begin = int(starts[line])
    end = int(starts[line + 1]) if line + 1 < n else len(text)
    # the line's length excludes its break
    content_end = end
    while content_end > begin and text[content_end - 1] in "\r\n" and content_end > end - 2:
        content_end -= 1
    if not (0 <= col <= content_end - begin):
        raise ValueError(f"column {col} is outside line {line} (it has {content_end - begin} characters)")
    return begin + col


def to_position(starts: np.ndarray, offset: int) -> tuple[int, int]:
    line = int(np.searchsorted(starts, offset, side="right")) - 1
    return line, offset - int(starts[line])
