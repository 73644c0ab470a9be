"""A decode step at reduced precision reads its cache's fp16 copy (pass_attention.py): its
attention equals the fp32 path's to fp16 rounding, with pending deltas (lazy), hidden suffixes
(a completion mid-file), FIM streams and the log-sum-exp a shared context merges with; at fp32
nothing changes; the copy is kept across edits and the cache's bytes say so."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv.incremental import layout
from livekv.incremental.attention import attend_lse, attention_with_deltas
from livekv.incremental.batch import Pass
from livekv.incremental.hydragen import shared_attention
from livekv.incremental.pass_attention import PassAttention

from conftest import excerpt, stdlib_source
from test_hydragen import with_context
from test_kv_mirror import _reads_as_cast

NEEDS = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16 matmuls here")
TEXT = excerpt(stdlib_source(), 300, 80)


def _step_pass(doc, line: int, precision: str, k: int = 1) -> tuple[PassAttention, torch.Tensor]:
    """The first decode step of k candidates at the start of `line`, as decode.py builds it
    (each candidate sees its own token, not the others')."""
    eng = doc.engine
    model = eng.model
    cur = doc.prompt.cursor(doc, doc.offset(line, 0), "", False)
    doc.before_completion(cur.j)
    doc.prompt.settle(doc)
    lay = layout.Completion(doc, cur, len(cur.tail) + 4 * k)
    first = lay.first_slot(0, k)
    p = Pass(doc.kv, torch.arange(7, 7 + k), torch.full((k,), cur.phi + len(cur.tail)),
             first if k == 1 else torch.arange(first, first + k), lay.step(0, list(range(k)), k), precision=precision,
             shared=layout.apart(doc), kv16=precision != "fp32")
    model.precision.set(precision, 1)
    x = model.embed(p.ids[None])
    return PassAttention(model, p, x), x


def _check(pa: PassAttention, seed: int) -> None:
    """Layer 1 of the pass, both ways: fp16 copy and fused kernel against fp32 K/V."""
    model, kv = pa.model, pa.p.kv
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = model.n_heads, model.n_kv_heads, model.head_dim
    n = pa.p.n
    q = torch.randn(1, H, n, D, generator=g)
    k, v = torch.randn(1, Hkv, n, D, generator=g), torch.randn(1, Hkv, n, D, generator=g)
    q_rot = pa._rope(q, 0)
    kv.write(1, pa.slots, k[0], v[0])
    K, V = kv.layer(1, pa.p.layout.n_keys)
    if pa.pending.runs is None:
        want, want_lse = attend_lse(q_rot, K, V, pa.mask, model.scaling)
    else:
        want, want_lse = attention_with_deltas(q, K, V, pa._rope, pa.pending.runs, pa.mask, model.scaling, with_lse=True)
    got, lse = pa._decode_fp16(q, q_rot, *kv.layer_as(1, pa.p.layout.n_keys, torch.float16), apart=True)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.004 * scale + 1e-4, (got - want).abs().max().item()
    assert torch.allclose(lse, want_lse, atol=5e-3, rtol=1e-3)


@NEEDS
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strategy=st.sampled_from(["pie", "lazy"]), at=st.integers(2, 70), cursor=st.integers(3, 78),
       seed=st.integers(0, 1000))
def test_a_decode_step_reads_the_fp16_copy_to_rounding(tiny_engine, strategy, at, cursor, seed):
    doc = tiny_engine.open("file:///d/bf16.py", TEXT, strategy=strategy, settle=False)
    doc.configure(precision="bf16")
    doc.settle()
    doc.edit((at, 0), (at, 0), "    total = total + step  # moved\n")  # lazy: a delta left pending below
    pa, _ = _step_pass(doc, cursor, "bf16")
    assert pa.fp16_decode and torch.float16 in doc.kv._kept
    runs = pa.decode_runs
    assert all(a < b for a, b, _, _ in runs) and all(b1 <= a2 for (_, b1, _, _), (a2, _, _, _) in zip(runs, runs[1:]))
    _check(pa, seed)
    tiny_engine.close(doc.uri)


@NEEDS
def test_a_fim_stream_skips_its_free_slots_and_reads_to_rounding(fim_engine):
    """A FIM stream's suffix marker sits past the region's free slots: a step reads two runs,
    and three candidates' rows each see their own token only."""
    doc = fim_engine.open("file:///d/fim.py", excerpt(stdlib_source(), 300, 400))  # free slots past MIN_SKIP
    doc.configure(precision="bf16")
    pa, _ = _step_pass(doc, 40, "bf16", k=3)
    assert pa.fp16_decode and pa.p.n == 3
    seen = pa.p.layout.mask.any(0).numpy()
    read = np.zeros_like(seen)
    for a, b, _, _ in pa.decode_runs:
        read[a:b] = True
    assert (read >= seen).all() and read.sum() < len(seen)       # everything seen, not everything
    _check(pa, 3)
    fim_engine.close(doc.uri)


@pytest.mark.parametrize("settings", [dict(precision="fp32"), dict(precision="bf16", decode_kv="fp32")])
def test_at_fp32_or_when_told_a_decode_reads_the_fp32_cache_and_keeps_no_copy(tiny_engine, settings):
    doc = tiny_engine.open("file:///d/fp32.py", TEXT, strategy="pie", settle=False)
    doc.configure(**settings)
    doc.settle()
    assert doc.suggest(30, 0).steps >= 2 and not doc.kv.mirrors and not doc.kv._kept
    tiny_engine.close(doc.uri)


@NEEDS
def test_a_completion_at_reduced_precision_keeps_the_copy_and_edits_reach_it(tiny_engine):
    doc = tiny_engine.open("file:///d/kept.py", TEXT, strategy="pie", settle=False)
    doc.configure(precision="bf16", decode_kv="fp16")
    doc.settle()
    L, H, D = doc.kv.shape
    assert doc.kv.bytes_per_token() == 2 * L * H * D * 4 and not doc.kv._kept   # an encode keeps no copy
    assert doc.suggest(30, 0).steps >= 1 and torch.float16 in doc.kv._kept
    assert doc.kv.bytes_per_token() == 2 * L * H * D * (4 + 2)                  # fp32 K/V and their fp16 copy
    doc.edit((5, 0), (5, 0), "import os\n")                  # the tail after line 5 rotates: a long change
    assert _reads_as_cast(doc.kv, doc.region.end, torch.float16)
    doc.edit((40, 0), (41, 0), "")                           # a deletion moves the tail down
    assert _reads_as_cast(doc.kv, doc.region.end, torch.float16)
    assert doc.suggest(20, 0).steps >= 1
    tiny_engine.close(doc.uri)


@NEEDS
def test_a_context_group_apart_is_read_from_its_fp16_copy_to_rounding(tiny_engine):
    """Hydragen's part of a decode step at reduced precision: the shared group's fp16 copy, its
    output and log-sum-exp those of its fp32 K/V to rounding."""
    ctx, doc = with_context(tiny_engine, True, "bf16apart")
    for d in (ctx, doc):
        d.configure(precision="bf16")
    pa, _ = _step_pass(doc, 8, "bf16")
    assert pa.fp16_decode and pa.p.shared == (ctx,)
    g = torch.Generator().manual_seed(5)
    pa.q = torch.randn(1, tiny_engine.model.n_heads, 1, tiny_engine.model.head_dim, generator=g)
    (got, got_lse), = shared_attention(1, [pa], tiny_engine.model.scaling)
    pa.fp16_decode = False
    (want, want_lse), = shared_attention(1, [pa], tiny_engine.model.scaling)
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max().item() <= 0.004 * want.abs().max().item() + 1e-4
    assert torch.allclose(got_lse, want_lse, atol=5e-3, rtol=1e-3)


def test_a_model_whose_kv_leave_fp16s_safe_range_decodes_from_the_fp32_cache(tiny_engine, monkeypatch):
    """The load measures the model's K/V (Transformer.kv_peak); past FP16_KV_PEAK a decode keeps
    no fp16 copy, whatever decode_kv says."""
    from livekv.incremental import decode
    assert 0 < tiny_engine.model.kv_peak <= decode.FP16_KV_PEAK
    monkeypatch.setattr(tiny_engine.model, "kv_peak", 2 * decode.FP16_KV_PEAK)
    doc = tiny_engine.open("file:///d/peak.py", TEXT, strategy="pie", settle=False)
    doc.configure(precision="bf16", decode_kv="fp16")
    doc.settle()
    assert doc.suggest(30, 0).steps >= 2 and not doc.kv._kept
    tiny_engine.close(doc.uri)


@NEEDS
@pytest.mark.parametrize("native", [True, False])
def test_auto_keeps_the_copy_only_where_the_cpu_computes_fp16_natively(tiny_engine, monkeypatch, native):
    """Without native fp16 (AVX512-FP16, AMX-FP16) torch's fused attention converts fp16 and runs
    slower than fp32: decode_kv auto then reads the fp32 cache; fp16 forces the copy anyway."""
    from livekv.incremental import decode
    monkeypatch.setattr(decode, "native_fp16", lambda device: native)
    for kv, kept in (("auto", native), ("fp16", True)):
        doc = tiny_engine.open(f"file:///d/native_{kv}.py", TEXT, strategy="pie", settle=False)
        doc.configure(precision="bf16", decode_kv=kv)
        doc.settle()
        assert doc.suggest(30, 0).steps >= 2
        assert (torch.float16 in doc.kv._kept) == kept, (kv, native)
        tiny_engine.close(doc.uri)


@NEEDS
def test_a_lazy_step_past_a_skipped_suffix_reads_each_runs_own_mask_columns(tiny_engine):
    """Pending deltas (lazy), a long hidden suffix that the runs skip, and three candidates that
    each see their own token only: a run after the skipped stretch has hidden columns inside
    it, and reads them where they sit in the runs' mask, not at their key index."""
    doc = tiny_engine.open("file:///d/lazyskip.py", excerpt(stdlib_source(), 300, 400), strategy="lazy",
                           settle=False)
    doc.configure(precision="bf16")
    doc.settle()
    doc.edit((5, 0), (5, 0), "    total = total + step  # moved\n")       # a delta left pending below
    pa, _ = _step_pass(doc, 40, "bf16", k=3)
    runs = pa.decode_runs
    assert pa.pending.runs is not None and len(runs) >= 2
    assert any(at != a for a, _, _, at in runs)                          # a stretch skipped before a run
    last_a, last_b, _, last_at = runs[-1]
    assert (pa.mask[:, last_at: last_at + last_b - last_a] < 0).any()     # hidden columns inside the last run
    _check(pa, 11)
    tiny_engine.close(doc.uri)
