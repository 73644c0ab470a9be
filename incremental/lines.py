"""Lines and columns of a text: (line, column) <-> offset, in UTF-8, UTF-16 or UTF-32 columns.

Lines end at "\\n", "\\r\\n" or "\\r", as in LSP (not str.splitlines, which also splits at form
feeds and Unicode separators). A column counts code units of an encoding: UTF-32 columns are code
points, i.e. Python str indices (the engine's unit); UTF-16 is LSP's default and what JS strings
count (an emoji is 2); UTF-8 counts bytes (a CJK character is 3). The engine, both servers and
the benchmark convert through this module only.
"""
from __future__ import annotations

import logging
import re

import numpy as np

log = logging.getLogger("livekv.lines")

BREAK = re.compile(r"\r\n|\r|\n")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
ENCODINGS = ("utf-32", "utf-16", "utf-8")
_UNITS = {"utf-32": "characters", "utf-16": "UTF-16 code units", "utf-8": "UTF-8 code units"}


def split_lines(text: str) -> list[str]:
    """Lines of text with their endings kept; "".join(result) == text."""
    return _LINE.findall(text)


def line_starts(text: str) -> np.ndarray:
    """(lines,) int64: the offset where each line begins; a text ending in a break has a last,
    empty line."""
    return np.array([0] + [m.end() for m in BREAK.finditer(text)], dtype=np.int64)


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


def line_span(starts: np.ndarray, text: str, line: int) -> tuple[int, int]:
    """(start, end) offsets of line's content, its break excluded; ValueError when there is no
    such line."""
    n = len(starts)
    if not 0 <= line < n:
        raise ValueError(f"line {line} is outside the document (it has {n} lines, 0..{n - 1})")
    begin = int(starts[line])
    end = int(starts[line + 1]) if line + 1 < n else len(text)
    while end > begin and text[end - 1] in "\r\n":
        end -= 1
    return begin, end


def units(s: str, encoding: str) -> int:
    """Length of s in code units of encoding."""
    if encoding == "utf-32" or s.isascii():
        return len(s)
    return sum(_width(c, encoding) for c in s)


def _width(ch: str, encoding: str) -> int:
    o = ord(ch)
    if encoding == "utf-16":
        return 2 if o > 0xFFFF else 1
    if encoding == "utf-8":  # lone surrogates (possible in JSON strings) count 3, as in WTF-8
        return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
    return 1


def _check(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown position encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")


def column(line: str, character: int, encoding: str = "utf-32") -> int:
    """The code point column of `character` (code units of encoding) on line, the line's text
    without its break. ValueError when it is negative, past the line's end, or inside a
    character (between the two UTF-16 halves of an emoji, say)."""
    _check(encoding)
    word = "column" if encoding == "utf-32" else "character"
    if character < 0:
        raise ValueError(f"{word} {character} is negative")
    u = 0
    if encoding == "utf-32" or line.isascii():
        col = character if character <= len(line) else None
        u = len(line)
    else:
        col = None
        for i, ch in enumerate(line):
            if u == character:
                col = i
                break
            w = _width(ch, encoding)
            if u + w > character:
                what = "a surrogate pair of 2 UTF-16 code units" if encoding == "utf-16" else f"{w} {_UNITS[encoding]} wide"
                raise ValueError(f"character {character} falls inside {ch!r} (column {i}), {what}; "
                                 "positions must be between characters")
            u += w
        else:
            col = len(line) if u == character else None
    if col is None:
        raise ValueError(f"{word} {character} is past the end of the line, outside its {u} "
                         f"{_UNITS[encoding]} (out of range)")
    return col


def character(line: str, col: int, encoding: str = "utf-32") -> int:
    """The column, in code units of encoding, of code point column col on line: column's inverse."""
    assert 0 <= col <= len(line), (col, len(line))
    return units(line[:col], encoding)


def to_offset(starts: np.ndarray, text: str, line: int, col: int, encoding: str = "utf-32",
              clamp: bool = False) -> int:
    """The offset of (line, col), col in code units of encoding; ValueError saying what is out
    of range. clamp: a column past the line's end means its end (as LSP clients' own
    vscode-languageserver-textdocument reads it), logged; a line past the end is still an error."""
    a, b = line_span(starts, text, line)
    if encoding == "utf-32" and 0 <= col <= b - a:
        return a + col
    if clamp and col > (n := units(text[a:b], encoding)):
        log.info("line %d: character %d is past the line's end (%d); taken as its end", line, col, n)
        return b
    try:
        return a + column(text[a:b], col, encoding)
    except ValueError as e:
        raise ValueError(f"line {line}: {e}") from None


def to_position(starts: np.ndarray, text: str, offset: int, encoding: str = "utf-32") -> tuple[int, int]:
    """(line, column) of offset, the column in code units of encoding; ValueError for an offset
    out of range or inside a "\\r\\n", which no (line, column) names."""
    if not 0 <= offset <= len(text):
        raise ValueError(f"offset {offset} is out of range: the document has {len(text)} characters")
    line = int(np.searchsorted(starts, offset, side="right")) - 1
    a, b = line_span(starts, text, line)
    if offset > b:
        raise ValueError(f"offset {offset} is inside a line ending; no (line, column) names it")
    return line, (offset - a if encoding == "utf-32" else character(text[a:b], offset - a, encoding))


def resolve(text: str, changes, encoding: str = "utf-32", clamp: bool = False) -> tuple[str, list | None]:
    """Changes applied in order to text, as an editor sends them: each ((line, col), (line, col))
    range (columns in code units of encoding) or None (the whole text), and its new text; each
    range refers to the text the changes before it left. Returns the final text and the changes
    with code point columns, for Document.edit_batch, or None for them when one replaced the whole
    text (then Document.set_text). ValueError, saying which change, for an invalid one. clamp:
    as to_offset."""
    out, full = [], False
    for i, (rng, new) in enumerate(changes):
        if rng is None:
            text, out, full = new, [], True
            continue
        try:
            starts = line_starts(text)
            (l1, c1), (l2, c2) = rng
            a, b = to_offset(starts, text, l1, c1, encoding, clamp), to_offset(starts, text, l2, c2, encoding, clamp)
            if b < a:
                raise ValueError(f"range end {tuple(rng[1])} is before its start {tuple(rng[0])}")
        except ValueError as e:
            raise ValueError(f"change {i + 1} of {len(changes)}: {e}; the document was left unchanged") from None
        out.append(((l1, a - int(starts[l1])), (l2, b - int(starts[l2])), new))
        text = text[:a] + new + text[b:]
    return text, (None if full else out)
