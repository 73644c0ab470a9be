"""pie-blend on a tiny random Llama: with the whole budget it is full, with none it is pie (on a
FIM stream too), and in between it recomputes only stale tokens after the edit, within the
budget, whatever the rule; it composes with groups, lazy layouts and batched candidates;
pie-refresh's idle work takes the rule's ranking first; the deviation rule narrows layer by layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from livekv.incremental import blend
from livekv.incremental.config import BLEND_RULES
from livekv.incremental.fim import FimStream
from livekv.incremental.groups import Workspace
from livekv.incremental.strategies import change_points

from conftest import excerpt, stdlib_source, tiny_llama, train_tokenizer
from test_fim import TEXT as FIM_TEXT
from test_strategies import line_edit, rel

TEXT = excerpt(stdlib_source(), 100, 40)
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def configured(tiny_engine):
    """Set the engine's blend settings for one test."""
    old = tiny_engine.config

    def set_(**kw):
        tiny_engine.config = old.updated(**kw)
        return tiny_engine
    yield set_
    tiny_engine.config = old


def edit_all(docs, e) -> bool:
    lines = docs[0].text.splitlines()
    if e[0][0] >= len(lines) - 1:
        return False
    if e[0] == e[1] and e[0][1]:
        col = min(e[0][1], len(lines[e[0][0]]))
        e = ((e[0][0], col), (e[0][0], col), e[2])
    for d in docs:
        d.edit(*e)
    return True


@settings(max_examples=15, **FAST)
@given(st.lists(line_edit(40), min_size=1, max_size=4), st.sampled_from(BLEND_RULES))
def test_the_whole_budget_is_full_and_none_is_pie(configured, edits, rule):
    eng = configured(blend_rule=rule, blend_ratio=1.0, blend_cap=100_000, blend_cursor=0)
    full = eng.open("file:///f.py", TEXT, strategy="full")
    whole = eng.open("file:///w.py", TEXT, strategy="pie-blend")
    for e in edits:
        edit_all([full, whole], e)
    k, v = whole.cached()
    kf, vf = full.cached()
    assert rel(k, kf) < 1e-5 and rel(v, vf) < 1e-5 and not whole.stale.any()
    line = whole.text.count("\n") - 1
    assert whole.complete(line, 0) == full.complete(line, 0)
    eng = configured(blend_rule=rule, blend_ratio=0.0, blend_cursor=0)
    pie = eng.open("file:///p.py", TEXT, strategy="pie")
    none = eng.open("file:///n.py", TEXT, strategy="pie-blend")
    for e in edits:
        edit_all([pie, none], e)
    assert torch.equal(none.cached()[0], pie.cached()[0]) and torch.equal(none.cached()[1], pie.cached()[1])
    assert none.stats["repaired_total"] == 0 and none.complete(line, 0) == pie.complete(line, 0)


@settings(max_examples=25, **FAST)
@given(st.lists(line_edit(40), min_size=1, max_size=3), st.sampled_from(BLEND_RULES), st.floats(0.0, 0.5),
       st.integers(0, 40))
def test_the_selection_is_after_the_edit_stale_and_within_the_budget(configured, edits, rule, ratio, cap):
    eng = configured(blend_rule=rule, blend_ratio=ratio, blend_cap=cap)
    doc = eng.open("file:///s.py", TEXT, strategy="pie")
    first_edit = None
    for e in edits:
        if not edit_all([doc], e):
            continue
        keep = doc.last_keep
        ch = change_points(keep)
        here = int(ch[0]) if len(ch) else len(keep)
        first_edit = here if first_edit is None else min(first_edit, here)
        n = blend.budget(doc)
        assert n <= cap and n <= np.ceil(ratio * doc.stale.sum())
        picked = blend.select(doc, keep, rule, n)
        assert len(picked) <= n and len(set(picked.tolist())) == len(picked)
        # stale ones only: after some edit, never before the first (those are exact)
        assert doc.stale[picked].all() and (picked >= first_edit).all()
        if rule == "window" and len(ch):  # the window is after this edit itself (when it changed anything)
            assert (picked >= here).all()


def test_an_edit_recomputes_its_budget_and_a_completion_the_tokens_before_the_cursor(configured):
    eng = configured(blend_rule="window+age", blend_ratio=0.15, blend_cap=24, blend_cursor=8)
    pie = eng.open("file:///p.py", TEXT, strategy="pie")
    doc = eng.open("file:///b.py", TEXT, strategy="pie-blend")
    for d in (pie, doc):
        d.edit((3, 0), (3, 0), "    q = compute(alpha)\n")
    s = doc.stats
    assert s["repaired_last_edit"] == min(24, int(np.ceil(0.15 * pie.stats["stale_tokens"])))
    assert s["tokens_encoded_last_edit"] == pie.stats["tokens_encoded_last_edit"] + s["repaired_last_edit"]
    assert s["repaired_share_last_edit"] == pytest.approx(s["repaired_last_edit"] / pie.stats["stale_tokens"])
    before = doc.stats["tokens_encoded_total"]
    doc.complete(30, 0)
    assert doc.stats["tokens_encoded_total"] - before == 8 and doc.stats["repaired_total"] == s["repaired_last_edit"] + 8
    doc.complete(30, 0)  # those are recomputed since the edit: not again
    assert doc.stats["repaired_total"] == s["repaired_last_edit"] + 8


def test_pie_blend_composes_with_groups_lazy_forks_and_candidates(configured):
    eng = configured(blend_ratio=1.0, blend_cap=100_000, blend_cursor=0)
    ws = Workspace(eng, prefix="# repo\n", span=256, strategy="pie-blend")
    ctx = ws.set_context("file:///c.py", excerpt(stdlib_source(), 300, 20))
    doc = ws.open("file:///m.py", TEXT)
    ws.edit_context("file:///c.py", [((2, 0), (2, 0), "    y = 2\n")])
    assert not ctx.stale.any()  # the context group repaired itself: only its own tokens moved
    doc.edit((5, 0), (5, 0), "    z = 3\n")
    assert doc.stats["repaired_last_edit"] > 0
    lazy = eng.open("file:///l.py", TEXT, strategy="lazy")
    lazy.edit((5, 0), (5, 0), "    z = 3\n")
    fork = lazy.fork("file:///lf.py", strategy="pie-blend")  # a lazy layout compacts, then blends
    fork.edit((8, 0), (8, 0), "    w = 4\n")
    first = int(np.flatnonzero(fork.last_keep < 0)[0])
    assert fork.region.order is None and (fork.region.ages()[first:] == 0).all()  # all recomputed
    assert len(fork.suggest(20, 0, n=3, max_new_tokens=3).texts) >= 1


def stream(doc) -> tuple:
    """A FIM stream's K/V in token order: prefix marker, text, suffix marker."""
    parts = [g.cached() for g in (doc.prompt.prefix_marker, doc, doc.prompt.suffix_marker)]
    return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


@settings(max_examples=6, **FAST)
@given(st.lists(line_edit(24), min_size=1, max_size=3), st.sampled_from(BLEND_RULES))
def test_on_a_fim_stream_the_whole_budget_is_a_rebuild_and_none_is_pie(fim_engine, edits, rule):
    """The same two limits on a FIM token stream (suffix marker mid-file), where the exact
    reference is the PSM prompt rebuilt on the final text (full drops the gap): the whole
    stream's K/V, markers included, and the completion."""
    gap = FIM_TEXT.index("\n", len(FIM_TEXT) // 2) + 1
    docs = {}
    for name, strategy, ratio in (("whole", "pie-blend", 1.0), ("pie", "pie", 0.0), ("none", "pie-blend", 0.0)):
        docs[name] = FimStream.open(fim_engine, f"file:///fim-{name}.py", FIM_TEXT, strategy, gap_at=gap)
        docs[name].configure(blend_rule=rule, blend_ratio=ratio, blend_cap=100_000, blend_cursor=0)
    try:
        for e in edits:
            edit_all(list(docs.values()), e)
        whole, g = docs["whole"], docs["whole"].prompt.gap
        docs["rebuilt"] = FimStream.open(fim_engine, "file:///fim-rebuilt.py", whole.text, "pie",
                                         gap_at=int(whole.state.ends[g - 1]) if g else 0)
        assert docs["rebuilt"].prompt.gap == g
        (k, v), (kf, vf) = stream(whole), stream(docs["rebuilt"])
        assert rel(k, kf) < 1e-5 and rel(v, vf) < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(stream(docs["none"]), stream(docs["pie"])))
        line = FIM_TEXT.count("\n") // 2
        assert whole.complete(line, 0) == docs["rebuilt"].complete(line, 0)
        assert docs["none"].complete(line, 0) == docs["pie"].complete(line, 0)
    finally:
        for d in docs.values():
            fim_engine.close(d.uri)


@settings(max_examples=15, **FAST)
@given(st.lists(line_edit(40), min_size=1, max_size=4), st.sampled_from(BLEND_RULES), st.integers(1, 60))
def test_idle_refresh_encodes_the_tokens_the_rule_ranks_highest_first(configured, edits, rule, n):
    eng = configured(blend_rule=rule)
    doc = eng.open("file:///idle.py", TEXT, strategy="pie-refresh")
    for e in edits:
        edit_all([doc], e)
    want = blend.ranked(doc, n)
    most = min(n, len(blend.candidates(doc)))
    assert len(want) == most  # the oldest fill what the rule leaves (a window below the last edit)
    ages = doc.region.ages().copy()
    assert doc.refresh(max_tokens=n, ranked=True) == len(want)  # nothing else was waiting before them
    after = doc.region.ages()
    others = np.setdiff1d(np.arange(doc.n), want)
    assert (after[want] == 0).all() and np.array_equal(after[others], ages[others])
    assert not len(np.intersect1d(blend.ranked(doc, n), want))  # not twice between edits


@pytest.fixture(scope="module")
def deep_engine():
    """Four layers: room for the deviation rule to narrow over three."""
    return tiny_llama(train_tokenizer(), layers=4, max_new_tokens=8)


@settings(max_examples=15, **FAST)
@given(st.lists(line_edit(40), min_size=1, max_size=3), st.integers(1, 3), st.integers(1, 30))
def test_deviation_narrows_its_pool_layer_by_layer_to_the_budget(deep_engine, edits, layers, n):
    doc = deep_engine.open("file:///deep.py", TEXT, strategy="pie")
    doc.configure(blend_layers=layers)
    try:
        for e in edits:
            edit_all([doc], e)
        keep, cand = doc.last_keep, blend.candidates(doc)
        first = int(change_points(keep)[0]) if len(change_points(keep)) else 0
        pool = np.union1d(blend.PICK["window"](doc, cand, keep, first, 2 * n),
                          blend.PICK["age"](doc, cand, keep, first, 2 * n))
        picked = blend.select(doc, keep, "deviation", n)
        assert len(picked) == min(n, len(pool)) and np.isin(picked, pool).all() and doc.stale[picked].all()
        doc.configure(blend_layers=deep_engine.model.n_layers)
        if len(cand):
            with pytest.raises(ValueError, match="at most 3"):
                blend.select(doc, keep, "deviation", n)
    finally:
        deep_engine.close(doc.uri)


@settings(max_examples=25, **FAST)
@given(st.lists(st.integers(0, 37), min_size=2, max_size=6, unique=True), st.integers(1, 40))
def test_a_batch_of_changes_shares_the_window_nearest_first(configured, lines, n):
    """A rename changes many places in one batch: the window takes the stale tokens nearest after
    any of its changes, not only the first change's."""
    eng = configured(blend_ratio=1.0, blend_cap=1000)
    doc = eng.open("file:///r.py", TEXT, strategy="pie")
    doc.edit((0, 0), (0, 0), "import os\n")  # stale tokens everywhere below, before the batch
    doc.edit_batch([((ln, 0), (ln, 0), "x_ = 1; ") for ln in sorted(lines, reverse=True)])
    keep, cand = doc.last_keep, blend.candidates(doc)
    ch = change_points(keep)
    assume(len(ch) >= 2)  # changes on neighbouring lines can retokenize into one
    picked = blend.select(doc, keep, "window", n)
    last = np.searchsorted(ch, cand, side="right") - 1
    dist = np.where(last >= 0, cand - ch[np.maximum(last, 0)], np.iinfo(np.int64).max)
    chosen = np.isin(cand, picked)
    assert len(picked) == min(n, int((last >= 0).sum())) and doc.stale[picked].all()
    if chosen.any() and (~chosen & (last >= 0)).any():  # nearest first: none left out is nearer
        assert dist[chosen].max() <= dist[~chosen & (last >= 0)].min()
