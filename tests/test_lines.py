"""The one line/column converter (incremental/lines.py) against Python's own codecs and against a
plain re-implementation: offsets and columns in UTF-8, UTF-16 and UTF-32, and batches of changes
applied one after another."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from livekv.incremental.lines import (ENCODINGS, character, column, line_span, line_starts, resolve, split_lines,
                                      to_offset, to_position, units)

TEXT = st.text(alphabet="ab\r\n😀你é\t", max_size=40)


def codec_units(s: str, enc: str) -> int:
    # independent of the code under test
    return {"utf-16": len(s.encode("utf-16-le")) // 2, "utf-8": len(s.encode("utf-8")), "utf-32": len(s)}[enc]


def test_position_conversions_agree_with_python_codecs():
    line = "a😀b你c\u00e9 \U0001F44B"
    for enc in ENCODINGS:
        for col in range(len(line) + 1):
            ch = codec_units(line[:col], enc)
            assert column(line, ch, enc) == col and character(line, col, enc) == ch
        with pytest.raises(ValueError, match="past the end"):
            column(line, codec_units(line, enc) + 1, enc)
    with pytest.raises(ValueError, match="falls inside"):
        column(line, 2, "utf-16")  # between the two halves of 😀
    with pytest.raises(ValueError, match="falls inside"):
        column(line, 3, "utf-8")
    with pytest.raises(ValueError, match="position encoding"):
        column(line, 0, "utf-7")


@settings(max_examples=200, deadline=None)
@given(TEXT, st.sampled_from(ENCODINGS))
def test_every_offset_round_trips_in_every_encoding(text, enc):
    starts = line_starts(text)
    assert "".join(split_lines(text)) == text and len(starts) == text.count("\n") + text.count("\r") \
        - text.count("\r\n") + 1
    for off in range(len(text) + 1):
        if 0 < off < len(text) and text[off - 1] == "\r" and text[off] == "\n":
            with pytest.raises(ValueError, match="inside a line ending"):
                to_position(starts, text, off, enc)
            continue
        line, ch = to_position(starts, text, off, enc)
        a, _ = line_span(starts, text, line)
        assert ch == codec_units(text[a:off], enc) == units(text[a:off], enc)
        assert to_offset(starts, text, line, ch, enc) == off


@settings(max_examples=200, deadline=None)
@given(TEXT, st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.text(alphabet="x\n😀", max_size=3)),
                      max_size=4), st.sampled_from(ENCODINGS))
def test_a_batch_is_its_changes_one_after_another(text, picks, enc):
    """resolve() applies each change to the text the ones before it left, and hands back the same
    changes in code points, or refuses the whole batch."""
    changes, cur = [], text
    for a, b, new in picks:  # valid changes, as an editor would send them
        a, b = sorted((min(a, len(cur)), min(b, len(cur))))
        starts = line_starts(cur)
        try:
            pa, pb = to_position(starts, cur, a, enc), to_position(starts, cur, b, enc)
        except ValueError:
            continue
        changes.append(((pa, pb), new))
        cur = cur[:a] + new + cur[b:]
    final, edits = resolve(text, changes, enc)
    assert final == cur
    again, _ = resolve(text, [(((s[0], s[1]), (e[0], e[1])), t) for s, e, t in edits], "utf-32")
    assert again == cur
    # a whole-text change restarts the batch from its text: no edits, the final text instead
    assert resolve(text, [*changes, (None, "z\n"), (((0, 1), (0, 1)), "y")], enc) == ("zy\n", None)


def test_a_bad_change_names_itself_and_what_was_wrong():
    text = "ab\ncd\n"
    for changes, words in [([(((0, 0), (0, 1)), "x"), (((9, 0), (9, 0)), "y")], "change 2 of 2: line 9 is outside"),
                           ([(((1, 2), (1, 0)), "")], "before its start"),
                           ([(((0, 3), (0, 3)), "")], "past the end of the line")]:
        with pytest.raises(ValueError, match=words):
            resolve(text, changes)
