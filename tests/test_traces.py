"""Trace builder of the edit-replay benchmark (bench/traces.py, bench/hunks.py). No network."""

import difflib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from livekv.bench import traces
from livekv.bench.hunks import (apply_edits, is_format_only, offset_to_position, position_to_offset, split_lines,
                                strip_eol)


def replay(old_text, new_text, steps):
    """Apply the steps like the benchmark does, checking every prediction point on the way;
    returns the prediction points [(line, truth)]."""
    new_lines = split_lines(new_text)
    doc, points = old_text, []
    for step in steps:
        doc = apply_edits(doc, step["edits"])
        p = step["predict"]
        if p is None:
            continue
        assert p["column"] == 0 and not step["format_only"]
        off = position_to_offset(doc, p["line"], 0)
        assert p["truth"] == strip_eol(new_lines[p["line"]])
        # the cursor is exactly where line t goes: everything before it is already new text
        assert doc[:off] == "".join(new_lines[:p["line"]])
        # and the line is not already sitting at the cursor
        rest = split_lines(doc[off:])
        assert not rest or strip_eol(rest[0]).strip() != p["truth"].strip()
        points.append((p["line"], p["truth"]))
    assert doc == new_text
    return points


def trace_of(old, new):
    tr = traces.file_trace(old, new, "pkg/mod.py", "pkg", "1.0", "1.1")
    return tr, replay(old, new, tr["steps"])


# ---------------------------------------------------------------- positions and edits

def test_split_lines_uses_lsp_separators_only():
    text = "a\r\nb\rc\nd\x0ce\u2028f\x85g"
    assert split_lines(text) == ["a\r\n", "b\r", "c\n", "d\x0ce\u2028f\x85g"]
    assert split_lines("x\n") == ["x\n"] and split_lines("") == []


def test_position_to_offset_and_errors():
    text = "ab\r\nc😀d\re"
    assert position_to_offset(text, 0, 2) == 2
    assert position_to_offset(text, 1, 3) == 7  # code points: the emoji is one column
    assert position_to_offset(text, 2, 1) == len(text)
    for line, col, msg in [(3, 0, "line 3"), (-1, 0, "line -1"), (0, 3, "column 3"), (1, 4, "column 4")]:
        with pytest.raises(ValueError, match=msg):
            position_to_offset(text, line, col)
    with pytest.raises(ValueError, match="inside a line ending"):
        offset_to_position(text, 3)  # between "\r" and "\n"
    assert offset_to_position(text, 7) == (1, 3)


def apply_edit(text, start, end, new):
    return apply_edits(text, [{"start": start, "end": end, "text": new}])


def test_apply_edit():
    assert apply_edit("héllo\nworld\n", [0, 1], [1, 2], "A") == "hArld\n"
    assert apply_edit("x\r\ny", [1, 0], [1, 0], "z") == "x\r\nzy"
    with pytest.raises(ValueError, match="before its start"):
        apply_edit("abc", [0, 2], [0, 1], "")
    with pytest.raises(ValueError, match="out of range"):
        apply_edit("abc", [0, 0], [0, 9], "")


# ---------------------------------------------------------------- release diffs

OLD = """import os
NAME = 'a'


def area(w, h):
    return w * h


def main():
    print(area(2, 3))
"""


def test_real_change_gets_prediction_with_truth():
    new = OLD.replace("    return w * h\n", "    if w < 0:\n        raise ValueError(w)\n    return w * h\n")
    tr, points = trace_of(OLD, new)
    assert points == [(5, "    if w < 0:")]
    assert tr["counts"] == dict(hunks=1, format_only=0, no_target=0, unsplittable=0, predictions=1)
    # the rest of the hunk arrives at the start of the next step, at the cursor
    assert tr["steps"][1]["edits"] == [{"start": [5, 0], "end": [5, 0], "text": "    if w < 0:\n        raise ValueError(w)\n"}]


@pytest.mark.parametrize("name,old,new,truths", [
    ("crlf", "a = 1\r\nb = 2\r\n", "a = 1\r\nx = 9\r\nb = 3\r\n", ["x = 9"]),
    ("lone-cr", "a = 1\rb = 2\r", "a = 1\rc = 5\rb = 2\r", ["c = 5"]),
    ("unicode", "s = 'é😀'\nt = 1\n", "s = 'é😀ü'\nt = 1\n", ["s = 'é😀ü'"]),
    ("no-eol-old", "a = 1\nb = 2", "a = 1\nb = 2\nc = 3\n", ["c = 3"]),
    ("no-eol-new", "a = 1\nb = 2\n", "a = 1\nb = 3", ["b = 3"]),
    ("no-eol-both", "a = 1\nb = 2", "a = 1\nb = 3", ["b = 3"]),
    ("start", "a = 1\nb = 2\n", "z = 0\na = 1\nb = 2\n", ["z = 0"]),
    ("end", "a = 1\nb = 2\n", "a = 1\nb = 2\nc = 3\n", ["c = 3"]),
    ("pure-delete", "a = 1\nb = 2\nc = 3\n", "a = 1\nc = 3\n", []),
    ("delete-all", "a = 1\n", "", []),
    ("from-empty", "", "a = 1\n", ["a = 1"]),
    ("two-hunks", "a = 1\nb = 2\nc = 3\nd = 4\n", "a = 0\nb = 2\nc = 3\nd = 5\ne = 6\n", ["a = 0", "d = 5"]),
    ("trivia-skipped", "f(\n    1,\n)\n", "f(\n    1,\n)\ng(\n)\n", ["g("]),
    ("only-trivia", "if x:\n    y = 1\n", "if x:\n    y = 1\n# done\n\n", []),
])
def test_edge_cases_rebuild_new_exactly(name, old, new, truths):
    _, points = trace_of(old, new)
    assert [t for _, t in points] == truths


def test_no_eol_edit_ends_mid_line_in_code_points():
    old, new = "s = 'é😀'", "s = 'é😀'\ny = 2\n"
    tr, points = trace_of(old, new)
    assert points == [(1, "y = 2")]  # not the old line that only gained a line ending
    assert tr["steps"][0]["edits"][0]["end"] == [0, 8]  # 8 code points (9 UTF-16 units)


def test_target_is_never_the_line_already_at_the_cursor():
    # difflib explains this as inserting "x = 1\nz = 2" before the old "x = 1"
    old, new = "x = 1\nb = 2\n", "x = 1\nz = 2\nx = 1\nb = 2\n"
    assert [op for op in difflib.SequenceMatcher(None, split_lines(old), split_lines(new), autojunk=False).get_opcodes()
            if op[0] != "equal"] == [("insert", 0, 0, 0, 2)]
    _, points = trace_of(old, new)
    assert points == [(1, "z = 2")]


def test_cursor_inside_crlf_is_not_a_prediction_point():
    # after the head "# c\r" the old line "\n" follows: the cursor would sit inside "\r\n"
    old, new = "a = 1\n\n", "# c\rb = 1\n\n"
    tr, points = trace_of(old, new)
    assert points == [] and tr["counts"]["unsplittable"] == 1


@pytest.mark.parametrize("kind,before,after", [
    ("whitespace", "    return w * h\n", "    return w*h\n"),
    ("reindent-args", "    print(area(2, 3))\n", "    print(area(2,\n               3))\n"),
    ("quotes", "NAME = 'a'\n", 'NAME = "a"\n'),
    ("trailing-comma", "    print(area(2, 3))\n", "    print(area(2, 3,))\n"),
    ("parens", "    return w * h\n", "    return (w * h)\n"),
    ("comment", "    return w * h\n", "    return w * h  # area\n"),
    ("annotation", "def area(w, h):\n", "def area(w: int, h: int) -> int:\n"),
])
def test_format_only_hunks_are_marked(kind, before, after):
    new = OLD.replace(before, after)
    assert new != OLD
    tr, points = trace_of(OLD, new)
    assert points == [] and tr["counts"]["format_only"] == tr["counts"]["hunks"] == 1
    assert all(s["format_only"] for s in tr["steps"])


def test_annotated_assignment_and_real_change_next_to_format_only():
    old = "x = 1\n\n\ndef f(a):\n    return a\n"
    new = "x: int = 1\n\n\ndef f(a):\n    return a + 1\n"
    tr, points = trace_of(old, new)
    assert [s["format_only"] for s in tr["steps"]] == [True, False, False]
    assert points == [(4, "    return a + 1")]
    # a new bare annotation declares something: not format-only
    tr, points = trace_of("class C:\n    a: int\n", "class C:\n    a: int\n    b: str\n")
    assert points == [(2, "    b: str")]


def test_format_only_falls_back_to_tokens_when_the_file_does_not_parse():
    old = "print 'hi'\nx = [1, 2]\n"  # Python 2: no AST
    assert is_format_only(old, 'print "hi"\nx = [1, 2,]\n')
    assert not is_format_only(old, "print 'bye'\nx = [1, 2]\n")
    old = "print 'hi'\ny = 0\nx = [1, 2]\n"
    tr, points = trace_of(old, 'print "hi"\ny = 0\nx = [1, 3]\n')
    assert [s["format_only"] for s in tr["steps"] if s["hunk"]] == [True, False]
    assert points == [(2, "x = [1, 3]")]


LINES = st.lists(st.sampled_from(["a = 1", "b = 2", "", "    c(", ")", "# note", "x😀 = 'é'", "d\x0ce", "if x:"]),
                 max_size=8)
ENDINGS = st.sampled_from(["\n", "\n", "\r\n", "\r"])


@st.composite
def texts(draw):
    body = draw(LINES)
    text = "".join(line + draw(ENDINGS) for line in body)
    return text.rstrip("\r\n") if draw(st.booleans()) else text


@settings(max_examples=400, deadline=None)
@given(texts(), texts())
def test_property_edits_rebuild_new_exactly(old, new):
    tr = traces.file_trace(old, new, "p.py")
    replay(old, new, tr["steps"])
    assert apply_edits(old, [e for s in tr["steps"] for e in s["edits"]]) == new


# ---------------------------------------------------------------- synthetic (PIE)

@pytest.mark.parametrize("kind,n_edits,line_delta", [("insert", 1, -1), ("delete", 1, 1), ("multi", 3, None)])
def test_synthetic_on_stdlib_file(kind, n_edits, line_delta):
    import random
    path = difflib.__file__
    text = Path(path).read_text(encoding="utf-8")
    lines = split_lines(text)
    got = traces.synthetic_traces(text, path, kind, 4, random.Random(f"0:difflib.py:{kind}"))
    assert len(got) == 4
    for tr in got:
        t = tr["target_line"]
        (step,) = tr["steps"]
        assert t >= len(lines) // 2 and len(step["edits"]) == n_edits
        assert tr["new_text"] == "".join(lines[:t] + lines[t + 1:]) == apply_edits(tr["old_text"], step["edits"])
        assert step["predict"] == {"line": t, "column": 0, "truth": strip_eol(lines[t])}
        assert position_to_offset(tr["new_text"], t, 0) == len("".join(lines[:t]))
        assert all(e["start"][0] < t for e in step["edits"])  # perturbations are above the target
        old_n, new_n = len(split_lines(tr["old_text"])), len(split_lines(tr["new_text"]))
        if line_delta is not None:
            assert old_n - new_n == line_delta
        assert tr["old_text"] != tr["new_text"]


@pytest.mark.parametrize("kind", ["insert", "delete", "multi"])
def test_synthetic_edits_stay_above_the_target_on_a_tiny_file(kind):
    import random
    lines = [f"v{i} = {i}\n" for i in range(8)]
    for seed in range(30):
        for tr in traces.synthetic_traces("".join(lines), "tiny.py", kind, 2, random.Random(seed)):
            t = tr["target_line"]
            assert all(e["start"][0] < t for e in tr["steps"][0]["edits"])
            assert tr["new_text"] == "".join(lines[:t] + lines[t + 1:])
    # repeated lines: the target must not reappear right at the cursor
    pairs = [f"v{i // 2} = 0\n" for i in range(12)]
    for seed in range(10):
        for tr in traces.synthetic_traces("".join(pairs), "pairs.py", kind, 3, random.Random(seed)):
            t = tr["target_line"]
            assert split_lines(tr["new_text"])[t:t + 1] != [pairs[t]]


def test_synthetic_cli_is_deterministic(tmp_path):
    args = ["--synthetic", difflib.__file__, "--per-file", "3", "--kinds", "insert,multi"]
    runs = []
    for seed, name in [(7, "a"), (7, "b"), (8, "c")]:
        assert traces.main(args + ["--seed", str(seed), "--out", str(tmp_path / f"{name}.jsonl")]) == 0
        runs.append(traces.load_traces(tmp_path / f"{name}.jsonl"))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert [tr["kind"] for tr in runs[0]] == ["insert"] * 3 + ["multi"] * 3
