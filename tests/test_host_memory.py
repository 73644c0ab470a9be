"""CPU memory tuning: slot moves in one pass (memmove) equal a copy through a temporary, for any\noverlap; freed big blocks are reused without page faults."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from livekv.incremental.host_memory import move_slots_


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


FAULTS = """
import json, resource, torch
from livekv.incremental.host_memory import keep_freed_memory
applied = [keep_freed_memory(), keep_freed_memory()]
faults = []
for _ in range(5):  # a 64 MiB temporary, every page written, then freed: an edit's big temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([applied, faults]))
"""


def page_faults(env: dict) -> tuple[list, list]:
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = json.loads(out.stdout)
    return applied, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    """With the tuning, a temporary the size of an edit's is served from pages already mapped;
    without it (LIVEKV_MALLOC=default, which must turn it off), every one faults them in again."""
    tuned_applied, tuned = page_faults(dict(os.environ))
    plain_applied, plain = page_faults(dict(os.environ, LIVEKV_MALLOC="default"))
    assert tuned_applied == [True, True] and plain_applied == [False, False]  # once per process, then a no-op
    assert min(plain[-2:]) > 8_000, plain   # 64 MiB of 4 KiB pages, faulted in each time
    assert max(tuned[-2:]) < min(plain[-2:]) / 8, (tuned, plain)
