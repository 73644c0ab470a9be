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


FOOTPRINT = """
import json, resource, torch
from livekv.incremental.host_memory import keep_freed_memory
def resident():  # bytes of this process in RAM
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
applied = [keep_freed_memory(), keep_freed_memory()]
kept, faults, where = [], [], []
for _ in range(8):  # a 64 MiB temporary, every page written, then freed: an edit's big temporaries
    base, before = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    where.append(t.data_ptr())
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    kept.append(resident() - base)
print(json.dumps([applied, kept, faults, where]))
"""


def footprint(env: dict) -> tuple[list, list, list, list]:
    out = subprocess.run([sys.executable, "-c", FOOTPRINT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(json.loads(out.stdout))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_stays_mapped_for_the_next_temporary():
    """With the tuning, a freed temporary the size of an edit's keeps its pages mapped and later
    ones take the same block; without it (LIVEKV_MALLOC=default, which must turn it off), free
    hands the pages back to the kernel and every temporary faults them in again. Page faults are
    only a loose check: a host with NUMA balancing faults mapped pages too."""
    tuned_applied, tuned_kept, tuned_faults, tuned_where = footprint(dict(os.environ))
    plain_applied, plain_kept, plain_faults, _ = footprint(dict(os.environ, LIVEKV_MALLOC="default"))
    assert tuned_applied == [True, True] and plain_applied == [False, False]  # once per process, then a no-op
    mib = 1 << 20
    assert all(k < 8 * mib for k in plain_kept), plain_kept      # unmapped on free
    assert min(plain_faults[-2:]) > 8_000, plain_faults          # 64 MiB of 4 KiB pages, faulted in each time
    assert tuned_kept[0] > 56 * mib, tuned_kept                  # the first one's pages stay resident...
    # ...and the block is reused: glibc may place the second beside the first (an aligned request
    # does not fit the freed chunk exactly), after which those two serve every later one.
    assert sum(tuned_kept) < 2.5 * 64 * mib, tuned_kept
    assert all(abs(k) < 8 * mib for k in tuned_kept[-4:]), tuned_kept
    assert len(set(tuned_where)) <= 2, tuned_where                # alternating between the two at most
