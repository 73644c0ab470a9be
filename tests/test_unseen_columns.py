"""A pass of many queries leaves out key columns none of them sees (a FIM stream's free slots)
when the scores it saves outweigh copying the columns it keeps (attention.PendingDeltas,
COPY_SKIP), and attends exactly as over every column."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from livekv.incremental.attention import COPY_SKIP, LAZY_MAX_QUERIES, MIN_SKIP, PendingDeltas
from livekv.incremental.layout import Layout


def layout(mask: torch.Tensor) -> Layout:
    """A layout of these visible columns with nothing pending (every key at its position)."""
    n_keys = mask.shape[1]
    return Layout(None, mask, columns=(np.zeros(n_keys, dtype=np.int64), np.arange(n_keys)))


@settings(max_examples=40, deadline=None)
@given(st.integers(64, 700), st.integers(0, 600), st.integers(0, 400), st.sampled_from([LAZY_MAX_QUERIES, 64, 160]),
       st.sampled_from([1, 3, 7]), st.integers(0, 2**16))
def test_many_queries_skip_unseen_columns_only_when_it_pays_and_attend_the_same(before, hole, after, n, rep, seed):
    N = before + hole + after
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, N, generator=g) < 0.9
    mask[:, 0] = True                                   # every query sees something
    mask[:, before:before + hole] = False                # nobody sees the hole
    pd = PendingDeltas(layout(mask), n, rep, torch.ones(4))
    kept = N - hole if hole >= MIN_SKIP else N           # shorter stretches join their neighbours
    pays = hole >= MIN_SKIP and n * rep * hole >= COPY_SKIP * kept
    assert (pd.runs is not None) == pays
    if not pays:
        return
    assert pd.copy and pd.cols.numel() == kept and not torch.isin(pd.cols, torch.arange(before, before + hole)).any()
    Hkv, D = 2, 8
    q = torch.randn(1, Hkv * rep, n, D, generator=g)
    K, V = torch.randn(1, Hkv, N, D, generator=g), torch.randn(1, Hkv, N, D, generator=g)
    add = torch.zeros(n, N).masked_fill_(~mask, float("-inf"))
    want = F.scaled_dot_product_attention(q, K, V, attn_mask=add, enable_gqa=rep > 1)
    K2, V2 = pd.rotated(K, V)
    got = F.scaled_dot_product_attention(q, K2, V2, attn_mask=add[:, pd.cols], enable_gqa=rep > 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_few_queries_keep_the_rule_of_per_run_scoring():
    """Below LAZY_MAX_QUERIES nothing is copied: a hole is skipped (scored per run) only from
    SKIP_ALONE columns or a quarter of the keys, whatever the queries."""
    mask = torch.ones(4, 10_000, dtype=torch.bool)
    mask[:, 1000:3000] = False                           # 2,000 unseen: under max(2048, 2500)
    assert PendingDeltas(layout(mask), 4, 7, torch.ones(4)).runs is None
    mask[:, 1000:4000] = False                           # 3,000 unseen: over both
    pd = PendingDeltas(layout(mask), 4, 7, torch.ones(4))
    assert pd.runs is not None and not pd.copy
