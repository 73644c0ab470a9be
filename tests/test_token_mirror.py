"""The token mirror's invariant: its ids always equal a fresh tokenization of its text."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv.incremental.lines import line_starts, splice_line_starts, to_offset, to_position
from livekv.incremental.token_mirror import TokenMirror

from conftest import excerpt, stdlib_source


def ref_position(text: str, offset: int) -> tuple[int, int]:
    """(line, col) by an independent route: LSP line breaks split with a regex."""
    line, start = 0, 0
    for m in re.finditer(r"\r\n|\r|\n", text):
        if m.end() > offset:
            break
        line, start = line + 1, m.end()
    return line, offset - start


def sources() -> list[str]:
    import argparse, json as js, textwrap as tw
    plain = excerpt(stdlib_source(argparse), 200, 120)
    return [
        plain,
        plain.replace("\n", "\r\n"),                                   # CRLF
        excerpt(stdlib_source(js.decoder), 0, 80) + "s = 'naïve café 😀 中文 ✓'\n",
        excerpt(stdlib_source(tw), 100, 60).replace("    ", "\t"),      # tabs
        "",
    ]


SOURCES = sources()
PIECES = ["", " ", "    ", "\n", "\r\n", "\r", "\t", "x", "foo", "_bar", "'", '"', '"""', "é", "😀", "中文",
          "def f(a, b):\n    return a + b\n", "0123", "# comment\n", ")", "(", ":", "  \n\n    ", "\\"]


@st.composite
def edits(draw):
    src = draw(st.sampled_from(range(len(SOURCES))))
    n = draw(st.integers(1, 8))
    ops = [(draw(st.floats(0, 1)), draw(st.integers(0, 40)),
            "".join(draw(st.lists(st.sampled_from(PIECES), max_size=4)))) for _ in range(n)]
    return src, ops


@pytest.fixture(scope="module")
def mirror(engine):
    return TokenMirror(engine.tokenizer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits())
def test_mirror_equals_fresh_tokenization(mirror, case):
    src, ops = case
    state = mirror.state(SOURCES[src])
    text = SOURCES[src]
    for frac, length, ins in ops:
        a = int(frac * len(text))
        b = min(len(text), a + length)
        # never split a CRLF pair with a range end: LSP positions cannot name that spot either
        if 0 < a < len(text) and text[a - 1] == "\r" and text[a] == "\n":
            a -= 1
        if 0 < b < len(text) and text[b - 1] == "\r" and text[b] == "\n":
            b += 1
        b = max(a, b)
        old = state
        state, splice = mirror.apply(state, ref_position(text, a), ref_position(text, b), ins)
        text = text[:a] + ins + text[b:]
        assert state.text == text
        fresh = mirror.tok(text, add_special_tokens=False).input_ids
        assert state.ids.tolist() == fresh
        # the splice is exactly what changed in token space
        rebuilt = np.concatenate([old.ids[: splice.start], np.array(splice.inserted, dtype=np.int64),
                                  old.ids[splice.start + splice.removed:]])
        assert rebuilt.tolist() == fresh
        assert np.array_equal(state.lines, line_starts(text))


def test_window_is_local_on_a_long_file(mirror):
    """An edit in the middle of a 10k-line file re-tokenizes a window, not the file."""
    import argparse
    text = (stdlib_source(argparse) * 4)
    assert text.count("\n") > 10_000
    state = mirror.state(text)
    calls = []
    real = mirror.tokenize
    mirror.tokenize = lambda s: calls.append(len(s)) or real(s)
    try:
        line = 5000
        new, splice = mirror.apply(state, (line, 4), (line, 4), "renamed_")
    finally:
        mirror.tokenize = real
    assert new.ids.tolist() == mirror.tok(new.text, add_special_tokens=False).input_ids
    assert max(calls) < 2_000, f"re-tokenized {max(calls)} chars for a one-word edit"
    assert 1 <= len(splice.inserted) <= 4


@pytest.mark.parametrize("bad", [((0, 0), (99999, 0)), ((0, 5), (0, 2)), ((-1, 0), (0, 0)), ((0, 0), (0, 10_000))])
def test_bad_ranges_are_refused_and_leave_state(mirror, bad):
    state = mirror.state("def f():\n    return 1\n")
    with pytest.raises(ValueError, match="outside|before"):
        mirror.apply(state, bad[0], bad[1], "x")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\r\n", max_size=30), st.integers(0, 30), st.integers(0, 5), st.text(alphabet="ab\r\n", max_size=6))
def test_line_starts_splice(text, a, length, ins):
    a = min(a, len(text))
    b = min(len(text), a + length)
    new = text[:a] + ins + text[b:]
    assert np.array_equal(splice_line_starts(line_starts(text), new, a, b, len(ins)), line_starts(new))
    starts = line_starts(new)
    for off in range(len(new) + 1):
        if 0 < off < len(new) and new[off - 1] == "\r" and new[off] == "\n":
            with pytest.raises(ValueError, match="inside a line ending"):
                to_position(starts, new, off)  # inside a CRLF: not a position
            continue
        line, col = to_position(starts, new, off)
        assert (line, col) == ref_position(new, off)
        assert to_offset(starts, new, line, col) == off
