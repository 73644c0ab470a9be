"""LSP positions <-> the engine's (line, column in code points).

An LSP `character` counts code units of the negotiated position encoding: UTF-16 (the default;
an emoji is 2 units), UTF-8 (a CJK character is 3 units) or UTF-32 (code points, as Python str
indices and the engine's columns). Lines end at "\\n", "\\r\\n" or "\\r", as in the engine.
"""
from __future__ import annotations

import re

ENCODINGS = ("utf-16", "utf-8", "utf-32")
_BREAK = re.compile(r"\r\n|\r|\n")


def _width(ch: str, encoding: str) -> int:
    o = ord(ch)
    if encoding == "utf-16":
        return 2 if o > 0xFFFF else 1
    if encoding == "utf-8":  # lone surrogates (possible in JSON strings) count 3, as in WTF-8
        return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
    return 1


def units(text: str, encoding: str) -> int:
    """Length of text in code units of encoding."""
    if encoding == "utf-32" or text.isascii():
        return len(text)
    return sum(_width(c, encoding) for c in text)


def to_column(line: str, character: int, encoding: str) -> int:
    """The code point column of an LSP `character` on line (the line's text, without its break).

    ValueError when it is past the line's end or falls inside a character (e.g. between the two
    UTF-16 halves of an emoji)."""
    assert encoding in ENCODINGS, encoding
    if character < 0:
        raise ValueError(f"character {character} is negative")
    if encoding == "utf-32" or line.isascii():
        if character > len(line):
            raise ValueError(f"character {character} is past the end of the line "
                             f"(it has {len(line)} {encoding} code units)")
        return character
    u = 0
    for col, ch in enumerate(line):
        if u == character:
            return col
        u += _width(ch, encoding)
        if u > character:
            raise ValueError(f"character {character} falls inside {ch!r} (column {col}), "
                             f"which is {_width(ch, encoding)} {encoding} code units wide")
    if u == character:
        return len(line)
    raise ValueError(f"character {character} is past the end of the line (it has {u} {encoding} code units)")


def to_character(line: str, column: int, encoding: str) -> int:
    """The LSP `character` of a code point column on line: the inverse of to_column."""
    assert 0 <= column <= len(line), (column, len(line))
    return units(line[:column], encoding)


def line_span(text: str, line: int) -> tuple[int, int]:
    """(start, end) offsets of line's content in text, its break excluded.

    ValueError when the line does not exist. Scans from the start: O(offset of the line)."""
    if line < 0:
        raise ValueError(f"line {line} is negative")
    start, n = 0, 0
    for m in _BREAK.finditer(text):
        if n == line:
            return start, m.start()
        start, n = m.end(), n + 1
    if n == line:
        return start, len(text)
    raise ValueError(f"line {line} is outside the document (it has {n + 1} lines, 0..{n})")


def to_offset(text: str, line: int, character: int, encoding: str) -> int:
    """The str offset in text of an LSP position; ValueError saying what is out of range."""
    a, b = line_span(text, line)
    try:
        return a + to_column(text[a:b], character, encoding)
    except ValueError as e:
        raise ValueError(f"line {line}: {e}") from None
