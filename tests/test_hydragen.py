"""Attention over disjoint key sets merged by log-sum-exp (attention.merge) is attention over their
union (hypothesis), and a document that sees a context group held in another cache (hydragen.py)
decodes exactly as one that sees the same group in its own cache (through its layout)."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from livekv.incremental import layout
from livekv.incremental.attention import attend, attend_lse, merge
from livekv.incremental.batch import Scheduler
from livekv.incremental.document import Document

from conftest import excerpt, stdlib_source


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.lists(st.integers(1, 40), min_size=1, max_size=4),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_merged_parts_are_attention_over_the_union(n, rep, widths, masked, seed):
    g = torch.Generator().manual_seed(seed)
    Hkv, D = 2, 8
    H, N = Hkv * rep, sum(widths)
    q = torch.randn(1, H, n, D, generator=g)
    K, V = torch.randn(1, Hkv, N, D, generator=g), torch.randn(1, Hkv, N, D, generator=g)
    mask = None
    if masked:  # each query sees a random subset, at least its first part's first column
        see = torch.rand(n, N, generator=g) < 0.6
        see[:, 0] = True
        mask = torch.zeros(n, N).masked_fill_(~see, float("-inf"))
    whole = attend(q, K, V, mask, 0.3)
    ref_out, ref_lse = attend_lse(q, K, V, mask, 0.3)
    assert torch.allclose(ref_out, whole, atol=1e-5)
    parts, at = [], 0
    for w in widths:
        sl = slice(at, at + w)
        parts.append(attend_lse(q, K[:, :, sl], V[:, :, sl], None if mask is None else mask[:, sl], 0.3))
        at += w
    # a part a query sees nothing of has lse -inf (and no output): it must weigh nothing
    parts = [(torch.nan_to_num(o), lse) for o, lse in parts]
    out, lse = merge(parts)
    assert torch.allclose(out, whole, atol=1e-5)
    assert torch.allclose(lse, ref_lse, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 48), st.integers(1, 3), st.integers(1, 80), st.booleans(), st.integers(0, 2**31 - 1))
def test_a_chunk_after_text_it_all_sees_attends_as_with_its_mask(n, rep, before, bf16, seed):
    """attend(causal_tail): an encode chunk of n queries after `before` columns every query
    sees attends to those apart, unmasked, and to its own n causally, merged: the same as one
    masked call (fp32 rounding; bf16's, in bf16)."""
    g = torch.Generator().manual_seed(seed)
    Hkv, D = 2, 16
    H, N = Hkv * rep, before + n
    q = torch.randn(1, H, n, D, generator=g)
    K, V = torch.randn(1, Hkv, N, D, generator=g), torch.randn(1, Hkv, N, D, generator=g)
    mask = torch.zeros(n, N)
    mask[:, before:] = torch.full((n, n), float("-inf")).triu(1)
    whole = attend(q, K, V, mask, 0.3, bf16=bf16).float()
    split = attend(q, K, V, mask, 0.3, bf16=bf16, causal_tail=True).float()
    assert torch.allclose(split, whole, atol=2e-2 if bf16 else 1e-5)


def test_an_encode_in_chunks_splits_each_chunk_after_the_first_and_keeps_its_kv(tiny_engine, monkeypatch):
    """A document encoded in chunks of 64: every chunk after the first (from CAUSAL_TAIL_MIN
    columns before it) attends apart to the text before it (causal_tail), and its K/V are those
    of an encode in one pass."""
    from livekv.incremental import attention, pass_attention
    text = excerpt(stdlib_source(), 700, 40)
    whole = Document(tiny_engine, "file:///t/whole.py", text, "pie", kv=tiny_engine.new_cache(2048))
    whole.settle()
    seen = []
    plain = attention.attend

    def spy(*a, **kw):
        seen.append(kw.get("causal_tail", False))
        return plain(*a, **kw)

    monkeypatch.setattr(pass_attention, "attend", spy)
    monkeypatch.setattr(pass_attention, "CAUSAL_TAIL_MIN", 64)  # a speed threshold; this file is small
    chunked = Document(tiny_engine, "file:///t/chunked.py", text, "pie", kv=tiny_engine.new_cache(2048))
    chunked.configure(encode_chunk=64)
    chunked.settle()
    layers = tiny_engine.model.n_layers
    n_chunks = -(-chunked.n // 64)
    assert chunked.n == whole.n > 128 and len(seen) == n_chunks * layers
    assert not any(seen[:layers]) and all(seen[layers: (n_chunks - 1) * layers])  # the last may be short
    s1, s2 = whole.region.slots(), chunked.region.slots()
    assert torch.allclose(whole.kv.k[:, :, s1], chunked.kv.k[:, :, s2], atol=1e-4)
    assert torch.allclose(whole.kv.v[:, :, s1], chunked.kv.v[:, :, s2], atol=1e-4)


CONTEXT = excerpt(stdlib_source(), 300, 30)
TEXT = excerpt(stdlib_source(), 900, 20)


def with_context(eng, apart: bool, tag: str):
    """A document at position 1024 that sees a context group encoded from 0: in its own cache
    (one cache, a layout mask) or in another (apart: group attention)."""
    own = eng.new_cache(4096)
    ctx_kv = eng.new_cache(1024) if apart else own
    ctx = Document(eng, f"file:///{tag}/ctx.py", CONTEXT, "pie", kv=ctx_kv, pos0=0)
    ctx.settle()
    doc = Document(eng, f"file:///{tag}/doc.py", TEXT, "pie", kv=own, pos0=1024, sees=[ctx])
    doc.settle()
    return ctx, doc


def test_a_group_apart_decodes_as_the_same_group_beside(tiny_engine):
    (c1, beside), (c2, apart) = with_context(tiny_engine, False, "beside"), with_context(tiny_engine, True, "apart")
    assert layout.apart(beside) == () and layout.apart(apart) == (c2,)
    assert torch.allclose(beside.kv.k[:, :, beside.region.slots()], apart.kv.k[:, :, apart.region.slots()], atol=1e-5)
    lines = TEXT.split("\n")
    for line in (4, 9, 15):
        a = beside.suggest(line, len(lines[line]), n=2)
        b = apart.suggest(line, len(lines[line]), n=2)
        assert (a.texts, a.ids) == (b.texts, b.ids)
        la = beside.teacher_forced(line, len(lines[line]), a.ids)
        lb = apart.teacher_forced(line, len(lines[line]), a.ids)
        assert torch.allclose(la, lb, atol=1e-4)


def test_a_shared_group_is_read_once_for_every_pass_that_sees_it(tiny_engine, monkeypatch):
    """Three documents, each in its own cache, see one context group in another: each decode
    step attends to the group once, with the queries of all three stacked."""
    from livekv.incremental import hydragen
    ctx_kv = tiny_engine.new_cache(1024)
    ctx = Document(tiny_engine, "file:///h/ctx.py", CONTEXT, "pie", kv=ctx_kv, pos0=0)
    ctx.settle()
    docs = [Document(tiny_engine, f"file:///h/{i}.py", excerpt(stdlib_source(), 1000 + 40 * i, 12), "pie",
                     pos0=1024, sees=[ctx]) for i in range(3)]
    for d in docs:
        d.settle()
    expected = [d.suggest(5, 0) for d in docs]
    calls = []
    real = hydragen.attend_lse
    monkeypatch.setattr(hydragen, "attend_lse", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    sched, got = Scheduler(tiny_engine.model), {}
    for i, d in enumerate(docs):
        sched.add(d.suggesting(5, 0), lambda v, e, i=i: got.__setitem__(i, v))
    sched.step()
    first = list(calls)
    while len(sched):
        sched.step()
    assert first == [sum(len(d.prompt.cursor(d, d.offset(5, 0), "", True).tail) for d in docs)] * \
        tiny_engine.model.n_layers  # one call per layer, every tail's queries in it
    assert [g.ids for g in (got[i] for i in range(3))] == [e.ids for e in expected]
    assert np.all(np.array(calls) >= 1)
