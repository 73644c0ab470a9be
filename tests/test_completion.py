"""The completion experience in the engine: stops, brackets, candidates, caps, typed-ahead reuse,
prefetch, and the incremental syntax tree."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from livekv.incremental.stops import Brackets, Stop, balanced_prefix
from livekv.incremental.syntax import SyntaxTree

from conftest import CountingForward, excerpt, stdlib_source

CODE = "import os\n\n\ndef area(width, height):\n    return width * height\n\n\nclass Shape:\n    def scale(self, k):\n"


# -- stops and brackets (pure) ---------------------------------------------------------------
def test_line_stop_cuts_at_newline_and_keeps_next_line_after_a_finished_one():
    assert Stop().cut("x = 1\ny = 2") == ("x = 1", True)
    assert Stop().cut("x = f(a") == ("x = f", False)
    assert Stop(leading_newline=True).cut("\n    return x\n") == ("\n    return x", True)


def test_block_stop_runs_to_the_dedent():
    s = Stop(mode="block", header_indent=4, max_lines=8)
    raw = "\n        w = self.w * k\n\n        return w\n    def other(self):"
    assert s.cut(raw) == ("\n        w = self.w * k\n\n        return w", True)
    assert Stop(mode="block", header_indent=0, max_lines=2).cut("\n  a\n  b\n  c\n") == ("\n  a\n  b", True)


def test_brackets_trim_to_the_last_balanced_point():
    ctx = Brackets()
    ctx.feed("total = compute(")
    assert balanced_prefix("a, b) + 1", ctx) == "a, b) + 1"           # closes the context's (
    assert balanced_prefix("a, [b, c", ctx) == "a, "                  # leaves [ open
    assert balanced_prefix("a)) + 2", ctx) == "a)"                   # a ) that closes nothing
    assert balanced_prefix("x = '(' + s", Brackets()) == "x = '(' + s"  # brackets in strings don't count
    assert balanced_prefix("f(x)  # )", Brackets()) == "f(x)  # )"     # nor in comments


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="()[]{}ab'\"#\n ", max_size=30))
def test_balanced_prefix_is_balanced_and_streams_monotonically(s):
    out = balanced_prefix(s, Brackets())
    assert s.startswith(out)
    b = Brackets()
    assert b.feed(out + " ") is None and b.stack == [] and b.quote is None  # " ": settle a trailing ''
    for i in range(len(s)):  # what was streamed for a prefix is never taken back
        assert out.startswith(balanced_prefix(s[:i], Brackets()))


# -- the syntax tree -----------------------------------------------------------------------------
def test_syntax_tree_stays_equal_to_a_fresh_parse_across_edits(tiny_engine):
    doc = tiny_engine.open("file:///syn.py", CODE)
    tree = doc.syntax_tree()
    assert tree is not None and tree.opens_block(len(CODE) - 1)
    doc.edit((4, 11), (4, 16), "w")                       # rename inside a line
    doc.edit((1, 0), (1, 0), "x = {'a': 1}\n")            # insert a line
    doc.edit((0, 0), (1, 0), "")                          # delete one
    tree = doc.syntax_tree()
    assert tree.reparses == 1 and tree.text == doc.text   # one incremental reparse for three edits
    assert str(tree.tree.root_node) == str(SyntaxTree(doc.text).tree.root_node)
    assert tree.imports() == [] and SyntaxTree(CODE).imports() == ["os"]
    dict_colon = doc.offset(0, 8)
    assert not tree.opens_block(dict_colon)               # a dict's colon opens no block


def test_block_mode_only_after_a_block_opening_colon(tiny_engine):
    from livekv.incremental.stops import stop_policy
    doc = tiny_engine.open("file:///blk.py", CODE + "d = {1:\n")
    end_def = doc.offset(8, len("    def scale(self, k):"))
    assert stop_policy(doc, end_def, "", True).mode == "block"
    assert stop_policy(doc, end_def, "", False).mode == "line"
    assert stop_policy(doc, doc.offset(9, 7), "", True).mode == "line"
    s = stop_policy(doc, doc.offset(4, len("    return width * height")), "", True)
    assert s.mode == "line" and s.leading_newline


# -- candidates, caps, reuse, prefetch (tiny model) -----------------------------------------------
def test_candidates_come_from_one_batched_decode(tiny_engine):
    doc = tiny_engine.open("file:///cand.py", excerpt(stdlib_source(), 100, 30))
    line = doc.text.count("\n")
    with CountingForward(tiny_engine.model) as one:
        c1 = doc.suggest(line, 0, n=1, max_new_tokens=6, multiline=False)
    with CountingForward(tiny_engine.model) as three:
        c3 = doc.suggest(line, 0, n=3, max_new_tokens=6, multiline=False)
    assert len(c3.texts) == 3 and len(set(c3.texts)) == 3
    assert c3.texts[0] == c1.text                        # candidate 0 is the greedy one
    # the tail once, then one forward per step for all candidates together: never k decodes
    assert len(one.rows) == c1.steps and len(three.rows) == c3.steps
    assert three.rows[0] == one.rows[0] and max(three.rows[1:], default=3) <= 3
    assert sum(three.rows[1:]) > sum(one.rows[1:])


def test_predict_cap_returns_a_partial_line(engine):
    doc = engine.open("file:///cap.py", CODE + "        self.width = self.width * k\n        self.height = ")
    end = doc.text.count("\n")
    free = doc.suggest(end, len("        self.height = "), max_new_tokens=12)
    assert free.steps >= 3 and not free.capped, free
    comp = doc.suggest(end, len("        self.height = "), max_new_tokens=12, max_predict_ms=0.001)
    assert comp.capped and comp.stop == "predict_cap" and comp.steps == 1
    assert free.text.startswith(comp.text) and len(comp.text) < len(free.text)
    assert doc.stats["predict_caps"] == 1


def test_prompt_cap_answers_incomplete_and_the_update_finishes_later(tiny_engine):
    doc = tiny_engine.open("file:///paste.py", "x = 1\n")
    paste = stdlib_source()[:20000]
    doc.edit((1, 0), (1, 0), paste, settle=False)         # a large paste, not encoded yet
    doc.encode_ms_per_token = 1.0                         # as measured on a slow machine
    end = doc.text.count("\n")
    comp = doc.suggest(end, 0, max_prompt_ms=50)
    assert comp.incomplete and comp.texts == [""] and doc.stats["prompt_caps"] == 1
    assert doc.stats["dirty_tokens"] > 0                  # nothing lost: still to be encoded
    assert doc.settle()                                   # the background update
    assert doc.stats["dirty_tokens"] == 0
    assert not doc.suggest(end, 0, max_prompt_ms=50, max_new_tokens=2).incomplete


PARTIAL = CODE + "        self.width = self.width * k\n        self.height = "


def test_typed_ahead_reuse_needs_no_model_call(engine):
    doc = engine.open("file:///ta.py", PARTIAL)
    line, col = doc.text.count("\n"), len("        self.height = ")
    first = doc.suggest(line, col, reuse=True, max_new_tokens=8).text
    assert len(first) >= 2, first
    typed = first[:2]
    doc.edit((line, col), (line, col), typed)              # the person types the start of it
    with CountingForward(engine.model) as fwd:
        again = doc.suggest(line, col + 2, reuse=True)
    assert fwd.rows == [] and again.reused and again.text == first[2:]
    assert doc.stats["reuse_hits"] == 1 and doc.stats["last_completion"]["steps"] == 0
    doc.edit((line, col + 2), (line, col + 2), "\u00a7")   # diverges: dropped
    with CountingForward(engine.model) as fwd:
        doc.suggest(line, col + 3, reuse=True, max_new_tokens=2)
    assert fwd.rows and doc.stats["reuse_hits"] == 1


def test_prefetch_answers_the_line_after_an_accepted_suggestion(engine):
    doc = engine.open("file:///pf.py", PARTIAL)
    line, col = doc.text.count("\n"), len("        self.height = ")
    shown = doc.suggest(line, col, reuse=True, max_new_tokens=8).text
    nxt = doc.prefetch(max_new_tokens=8)
    assert nxt is not None and nxt.startswith("\n"), nxt  # the next line, after the accepted one
    doc.edit((line, col), (line, col), shown)               # Tab: the suggestion is inserted
    with CountingForward(engine.model) as fwd:
        again = doc.suggest(line, col + len(shown), reuse=True)
    assert fwd.rows == [] and again.text == nxt
    # and it is what a model call at that point gives
    assert doc.suggest(line, col + len(shown), max_new_tokens=8).text == nxt


def test_brackets_the_rest_of_the_line_closes_are_left_to_it(engine):
    from livekv.incremental.stops import stop_policy
    doc = engine.open("file:///oc.py", "items = [1, 2]\nprint(len())\nprint(len(\n")
    auto_closed = doc.offset(1, len("print(len("))
    assert stop_policy(doc, auto_closed, "", True).context.stack == []
    assert stop_policy(doc, doc.offset(2, len("print(len(")), "", True).context.stack == ["(", "("]
    suggestion = doc.complete(1, len("print(len("), max_new_tokens=6)
    assert suggestion and ")" not in suggestion.replace("()", "")  # "items", not "items))": the line has its ))
