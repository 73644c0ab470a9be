"""Slot moves in one pass (memmove) must equal a copy through a temporary, for any overlap."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from livekv.incremental.host_memory import keep_freed_memory, move_slots_


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 40), st.integers(0, 40), st.sampled_from([torch.float32, torch.bfloat16]))
def test_move_slots_equals_a_copy_through_a_temporary(n, src, dst, dtype):
    C = 90
    buf = torch.randn(3, 2, C, 8).to(dtype)  # (L, H, C, D)
    want = buf.clone()
    want[:, :, dst: dst + n] = want[:, :, src: src + n].clone()
    move_slots_(buf, src, dst, n)
    assert torch.equal(buf, want)


def test_a_strided_buffer_takes_the_copying_path():
    base = torch.randn(2, 2, 50, 16)
    buf = base[..., :8]  # not contiguous: rows are not memmove-able
    want, rest = buf.clone(), base[..., 8:].clone()
    want[:, :, 3:23] = want[:, :, 0:20].clone()
    move_slots_(buf, 0, 3, 20)
    assert torch.equal(buf, want) and torch.equal(base[..., 8:], rest)  # the other columns untouched


def test_keep_freed_memory_is_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
