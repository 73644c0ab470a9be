"""Lazy deltas: moved keys stay put and attention rotates queries instead; same scores as pie."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv import kernels
from livekv.incremental.groups import Workspace
from livekv.incremental.attention import attention_with_deltas, delta_runs
from livekv.incremental.layout import Layout

from conftest import excerpt, stdlib_source
from test_strategies import line_edit, rel

TEXT = excerpt(stdlib_source(), 100, 40)
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
INSERT = ((10, 0), (10, 0), "    value = compute(alpha, beta)\n")


def apply(doc, e):
    """Apply a drawn line edit when it still fits the text (edits shrink and grow it)."""
    lines = doc.text.splitlines()
    if e[0][0] >= len(lines) - 1:
        return False
    if e[0] == e[1] and e[0][1]:
        col = min(e[0][1], len(lines[e[0][0]]))
        e = ((e[0][0], col), (e[0][0], col), e[2])
    doc.edit(*e)
    return True


def next_logits(doc, token: int = 13) -> torch.Tensor:
    """Logits of one query after the whole document, attending to every token of it."""
    S = doc.scratch(1)
    vis = torch.zeros(1, S + 1, dtype=torch.bool)
    vis[0, torch.from_numpy(np.asarray(doc.region.slots(np.arange(doc.n))))] = True
    vis[0, S] = True
    return doc.engine.model.forward(doc.kv, torch.tensor([token]), torch.tensor([doc.pos0 + doc.n]), S,
                                    Layout(doc.kv, vis), logits_at=torch.tensor([0]))[0]


@pytest.fixture
def segments(tiny_engine):
    """Set the engine's compaction threshold for one test."""
    old = tiny_engine.config

    def set_(n):
        tiny_engine.config = old.updated(lazy_segments=n)
    yield set_
    tiny_engine.config = old


@settings(max_examples=20, **FAST)
@given(st.lists(line_edit(40), min_size=1, max_size=5))
def test_lazy_scores_and_encodes_like_pie(tiny_engine, segments, edits):
    """Rotating the query by -d scores like rotating the key by +d: after any edits a lazy
    document gives pie's logits, and once compacted its K/V equal pie's at every layer."""
    segments(1000)  # never compact on its own: the pending deltas are what is tested
    pie = tiny_engine.open("file:///p.py", TEXT, strategy="pie")
    lazy = tiny_engine.open("file:///l.py", TEXT, strategy="lazy")
    for e in edits:
        if apply(pie, e):
            apply(lazy, e)
            assert lazy.stats["keys_rotated_last_edit"] == 0
    assert lazy.token_ids == pie.token_ids and np.array_equal(lazy.positions, pie.positions)
    assert np.array_equal(lazy.stale, pie.stale)
    a, b = next_logits(pie), next_logits(lazy)
    assert rel(b, a) < 1e-5
    k, v = lazy.cached()  # compacts
    assert lazy.region.order is None and lazy.stats["pending_keys"] == 0
    kp, vp = pie.cached()
    assert rel(k, kp) < 1e-5 and rel(v, vp) < 1e-5
    assert rel(next_logits(lazy), a) < 1e-5


def test_an_edit_leaves_every_kept_key_untouched(tiny_engine, segments):
    segments(1000)
    doc = tiny_engine.open("file:///l.py", TEXT, strategy="lazy")
    k0, v0 = doc.kv.k.clone(), doc.kv.v.clone()
    s = doc.edit(*INSERT)
    n_new = int((doc.last_keep < 0).sum())
    assert s["keys_rotated_last_edit"] == 0 and s["tokens_encoded_last_edit"] == n_new
    kept = doc.region.slots(np.flatnonzero(doc.last_keep >= 0))
    assert torch.equal(doc.kv.k[:, :, kept], k0[:, :, kept]) and torch.equal(doc.kv.v[:, :, kept], v0[:, :, kept])
    # the suffix waits with a pending delta of exactly the insertion's length
    assert s["pending_keys"] > 0 and set(np.unique(doc.region.delta[kept - doc.slot0])) == {0, n_new}
    assert s["pending_segments"] == 3 and s["holes"] == 0  # prefix, moved suffix, new tokens at the end


def test_a_paste_compacts_and_scores_like_pie(tiny_engine, engine, segments):
    """Many new tokens at once: per-run scoring would cost more than one real rotation, so the
    document compacts first; in a workspace, a context's pending deltas stay and the paste
    attends to them through a rotated copy of the keys (then SDPA). Pie's scores either way."""
    segments(1000)
    paste = excerpt(stdlib_source(), 300, 5)
    big = excerpt(stdlib_source(), 400, 40)
    docs = {s: tiny_engine.open(f"file:///{s}.py", TEXT, strategy=s) for s in ("pie", "lazy")}
    for d in docs.values():
        d.edit(*INSERT)
        d.edit((25, 0), (25, 0), paste)
    lazy = docs["lazy"].stats  # 32 to 127 tokens: through a rotated copy of the keys
    assert 32 <= lazy["tokens_encoded_last_edit"] < 128 and lazy["keys_rotated_total"] == 0 and lazy["pending_keys"]
    assert rel(next_logits(docs["lazy"]), next_logits(docs["pie"])) < 1e-5
    for d in docs.values():
        d.edit((30, 0), (30, 0), big)
    lazy = docs["lazy"].stats  # 128 or more: compacted first
    assert lazy["tokens_encoded_last_edit"] >= 128 and lazy["keys_rotated_last_edit"] > 0 and lazy["compactions"] == 1
    assert lazy["pending_keys"] == 0
    assert rel(next_logits(docs["lazy"]), next_logits(docs["pie"])) < 1e-5
    out = {}  # the real model: a tiny random one attends almost uniformly, blind to positions
    for strategy in ("pie", "lazy"):
        ws = Workspace(engine, prefix="# repo\n", span=1024, strategy=strategy)
        ctx = ws.set_context("file:///c.py", TEXT)
        doc = ws.open("file:///main.py", TEXT)
        ws.edit_context("file:///c.py", [INSERT])
        doc.edit((25, 0), (25, 0), paste)
        out[strategy] = next_logits(doc)
        if strategy == "lazy":
            assert ctx.stats["pending_keys"] > 0 and doc.stats["tokens_encoded_last_edit"] >= 32
    assert rel(out["lazy"], out["pie"]) < 1e-5


@pytest.mark.parametrize("strategy", ["pie", "lazy"])
def test_typing_does_not_regrow_the_cache(tiny_engine, strategy):
    """A region has slack for edits: the first keystrokes (and a fork's) copy no cache."""
    doc = tiny_engine.open(f"file:///{strategy}.py", TEXT, strategy=strategy)
    fork = doc.fork(f"file:///{strategy}-fork.py")
    for d in (doc, fork):
        k = d.kv.k
        for i in range(5):
            d.edit((10, 0), (10, 0), "    x = 1\n")
        d.complete(12, 0)
        assert d.kv.k is k, "the cache buffer was reallocated"


def test_segments_past_the_threshold_compact(tiny_engine, segments):
    segments(5)
    doc = tiny_engine.open("file:///l.py", TEXT, strategy="lazy")
    assert doc.edit((30, 0), (30, 0), "    # one\n")["pending_segments"] == 3
    # runs in slot order: before line 5, lines 5-30, after 30, the first insertion, the second
    s = doc.edit((5, 0), (5, 0), "    # two\n")
    assert s["compactions"] == 0 and s["pending_segments"] == 5
    s = doc.edit((20, 0), (20, 0), "    # three\n")  # seven runs: over the threshold
    assert s["compactions"] == 1 and s["keys_rotated_last_edit"] > 0 and doc.region.order is None
    assert s["pending_keys"] == 0 and doc.positions.tolist() == list(range(doc.n))
    ref = tiny_engine.open("file:///ref.py", doc.text, strategy="full")
    assert rel(doc.kv.k[0, :, :doc.n], ref.kv.k[0, :, :doc.n]) < 1e-5  # layer 0: token and position only


def test_deletions_leave_holes_until_they_outnumber_the_tokens(tiny_engine, segments):
    segments(1000)
    text = excerpt(stdlib_source(), 100, 120)
    doc = tiny_engine.open("file:///l.py", text, strategy="lazy")
    s = doc.edit((1, 0), (3, 0), "")
    assert s["holes"] > 0 and s["compactions"] == 0
    s = doc.edit((1, 0), (100, 0), "")  # most of the file
    assert s["compactions"] == 1 and s["holes"] == 0 and doc.region.used == doc.n
    pie = tiny_engine.open("file:///p.py", text, strategy="pie")
    pie.edit((1, 0), (3, 0), "")
    pie.edit((1, 0), (100, 0), "")
    assert rel(next_logits(doc), next_logits(pie)) < 1e-5


def test_lazy_completions_equal_pie_on_the_real_model(engine):
    text = excerpt(stdlib_source(), 100, 80)
    pie = engine.open("file:///p.py", text, strategy="pie")
    lazy = engine.open("file:///l.py", text, strategy="lazy")
    for e in (INSERT, ((30, 0), (31, 0), ""), ((50, 0), (50, 0), "import os\n")):
        pie.edit(*e)
        lazy.edit(*e)
        assert lazy.stats["keys_rotated_last_edit"] == 0
        assert lazy.complete(40, 0) == pie.complete(40, 0)
    fork = lazy.fork("file:///f.py", strategy="pie")  # a pie fork of a lazy layout: compacted on its next edit
    fork.edit((2, 0), (2, 0), "# x\n")
    pie.edit((2, 0), (2, 0), "# x\n")
    assert fork.region.order is None and fork.complete(40, 0) == pie.complete(40, 0)
    for uri in ("file:///p.py", "file:///l.py", "file:///f.py"):
        engine.close(uri)


def test_lazy_groups_in_a_workspace(engine):
    ctx = excerpt(stdlib_source(), 300, 20)
    out = {}
    for strategy in ("pie", "lazy"):
        ws = Workspace(engine, prefix="# repo\n", span=1024, strategy=strategy)
        ws.set_context("file:///c.py", ctx)
        doc = ws.open("file:///main.py", TEXT)
        ws.edit_context("file:///c.py", [((3, 0), (3, 0), "    extra = compute(1, 2)\n")])
        doc.edit(*INSERT)
        ws.settle()
        out[strategy] = next_logits(doc)
        if strategy == "lazy":
            assert ws.contexts["file:///c.py"].stats["pending_keys"] > 0 and doc.stats["pending_keys"] > 0
    assert rel(out["lazy"], out["pie"]) < 1e-5


@st.composite
def pending(draw):
    N = draw(st.integers(1, 40))
    cuts = sorted(draw(st.lists(st.integers(1, N - 1), max_size=4, unique=True))) if N > 1 else []
    bounds = [0, *cuts, N]
    delta = np.concatenate([np.full(b - a, draw(st.integers(-50, 50))) for a, b in zip(bounds, bounds[1:])])
    seen = np.array(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    return delta.astype(np.int64), seen


@settings(max_examples=200, deadline=None)
@given(pending(), st.integers(1, 6))
def test_delta_runs_cover_every_seen_column_with_its_delta(case, min_skip):
    delta, seen = case
    runs = delta_runs(delta, seen, min_skip)
    assert all(a < b <= c for (a, b, _), (c, _, _) in zip(runs, runs[1:])) and all(a < b for a, b, _ in runs)
    covered = np.zeros(len(delta), dtype=bool)
    for a, b, d in runs:
        covered[a:b] = True
        assert all(delta[j] == d for j in range(a, b) if seen[j])
    assert covered[seen].all()
    # what is left out is only stretches nobody sees, each at least min_skip long
    gaps = np.flatnonzero(np.diff(np.concatenate([[0], (~covered).astype(np.int8), [0]])))
    assert all(not seen[a:b].any() and b - a >= min_skip for a, b in zip(gaps[0::2], gaps[1::2]))


@settings(max_examples=30, deadline=None)
@given(pending(), st.integers(1, 3), st.sampled_from([1, 2]))
def test_attention_with_deltas_equals_attention_over_rotated_keys(case, n, rep):
    """The lazy attention against keys left at stale rotations equals SDPA over keys really
    rotated by their deltas (the cos/sin tables are HF-style: (n, D) halves repeated)."""
    delta, seen = case
    seen[:] = True
    N, Hkv, D = len(delta), 2, 8
    g = torch.Generator().manual_seed(int(np.abs(delta).sum()) + N)
    q = torch.randn(1, Hkv * rep, n, D, generator=g)
    K = torch.randn(1, Hkv, N, D, generator=g)
    V = torch.randn(1, Hkv, N, D, generator=g)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D))
    kpos, qpos = torch.arange(N), torch.arange(N, N + n)

    def tables(p):
        ang = p.float()[:, None] * inv_freq[None]
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin()

    def rot(x, p):
        c, s = tables(p)
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat([-x2, x1], -1) * s

    Kr = rot(K, kpos)
    true = Kr.clone()
    kernels.rerotate_keys_(true, torch.from_numpy(delta), inv_freq, positions=kpos)
    mask = torch.zeros(n, N)
    mask[:, : max(1, N // 2)] = float("-inf") if N > 2 else 0.0
    want = F.scaled_dot_product_attention(rot(q, qpos), true, V, attn_mask=mask, enable_gqa=rep > 1)
    if N > 2:  # the masked half is one stretch nobody sees: it may be left out of the runs
        seen[: N // 2] = False
    runs = delta_runs(delta, seen, min_skip=2)
    cols = torch.cat([torch.arange(a, b) for a, b, _ in runs])
    got = attention_with_deltas(q, Kr, V, lambda x, d: rot(x, qpos - d), runs, mask[:, cols], D ** -0.5)
    assert torch.allclose(got, want, atol=1e-5)
