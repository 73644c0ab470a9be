"""The reduced-precision copies of a KV cache (kv_mirror.py; KVCache.mirrored, keep_mirror): while
held or kept, layer_as equals the cache's K/V cast after any sequence of writes, moves, growth and
outside changes, short (cast at once) or long (cast when read), of keys alone or both, with the
copy moved along with the cache (hypothesis state machine); a
document's edit (rotated keys) and fork reach it; an encode in chunks at bf16 gives the same K/V
with it as without it."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from livekv.incremental import kv_mirror
from livekv.incremental.document import Document
from livekv.incremental.kv_cache import KVCache

from conftest import excerpt, stdlib_source

L, H, D = 3, 2, 4


class MirrorMachine(RuleBasedStateMachine):
    """Random operations on a cache whose mirror is held; every layer read in bf16 must equal
    the fp32 cache cast, whatever came before."""

    @initialize(cap=st.integers(4, 40))
    def start(self, cap):
        self.kv = KVCache(L, H, D, torch.float32, torch.device("cpu"), torch.ones(D // 2), capacity=cap)
        self.kv.k.normal_()
        self.kv.v.normal_()
        self.hold = self.kv.mirrored()
        self.hold.__enter__()
        self.seed = 0

    def _rows(self, m):
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(H, m, D, generator=g), torch.randn(H, m, D, generator=g)

    @rule(i=st.integers(0, L - 1), at=st.integers(0, 60), m=st.integers(1, 8))
    def write_run(self, i, at, m):
        at = min(at, self.kv.capacity - m)
        if at >= 0:
            self.kv.write(i, at, *self._rows(m))

    @rule(i=st.integers(0, L - 1), slots=st.lists(st.integers(0, 60), min_size=1, max_size=6, unique=True))
    def write_scattered(self, i, slots):
        slots = [s for s in slots if s < self.kv.capacity]
        if slots:
            self.kv.write(i, torch.tensor(slots), *self._rows(len(slots)))

    @rule(src=st.integers(0, 60), dst=st.integers(0, 60), n=st.integers(1, 10))
    def move(self, src, dst, n):
        self.kv.move(src, dst, n)

    @rule(n=st.integers(1, 120))
    def reserve(self, n):
        self.kv.reserve(n)

    @rule(i=st.integers(0, L - 1), at=st.integers(0, 60), m=st.integers(1, 8), say=st.sampled_from(["all", "from", "range"]),
          values=st.booleans())
    def outside_change(self, i, at, m, say, values):
        """A writer outside the cache's methods (Region's rotations) says what it changed: all,
        the slots from its first on, or its range (short ranges are cast at once); keys alone
        (a rotation) or values too."""
        if at >= self.kv.capacity:
            return
        self.kv.k[i, :, at: at + m] += 1.0
        if values:
            self.kv.v[i, :, at: at + m] -= 1.0
        self.kv.changed(*{"all": (), "from": (at,), "range": (at, min(at + m, self.kv.capacity))}[say], values=values)

    @rule()
    def keep(self):
        """A decode at reduced precision keeps an fp16 copy for good."""
        self.kv.keep_mirror(torch.float16)

    @rule()
    def let_go_and_hold_again(self):
        """Writes while nobody holds or keeps it are not the copy's either."""
        self.hold.__exit__(None, None, None)
        assert torch.bfloat16 not in self.kv.mirrors
        self.write_run(0, 0, 4)
        self.hold = self.kv.mirrored()
        self.hold.__enter__()

    @rule(i=st.integers(0, L - 1), n=st.integers(1, 120), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
    def read(self, i, n, dtype):
        n = min(n, self.kv.capacity)
        K, V = self.kv.layer_as(i, n, dtype)
        k, v = self.kv.layer(i, n)
        assert torch.equal(K, k.to(dtype)) and torch.equal(V, v.to(dtype))

    @invariant()
    def the_copy_is_the_cache_cast_below_its_watermarks(self):
        """Checked without reading through layer_bf16, which would bring every column up to
        date and leave no stale one for the next rule (a move of a partly stale range)."""
        kv = self.kv if hasattr(self, "kv") else None
        for dtype, mirror in ({} if kv is None else kv.mirrors).items():
            for j, (m, t) in enumerate(zip(mirror.kv, (kv.k, kv.v))):
                for i in range(L):
                    h = mirror.hi[j][i]
                    assert 0 <= h <= kv.capacity and torch.equal(m[i, :, :h], t[i, :, :h].to(dtype)), (dtype, j, i, h)

    def teardown(self):
        if hasattr(self, "hold"):
            self.hold.__exit__(None, None, None)
            assert torch.bfloat16 not in self.kv.mirrors  # freed with its last holder


TestMirrorMachine = MirrorMachine.TestCase
TestMirrorMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(0, 40), src=st.integers(0, 30), dst=st.integers(0, 30), n=st.integers(1, 10))
def test_a_moved_watermark_is_the_longest_valid_prefix(h, src, dst, n):
    """kv_mirror.moved: slots valid below h, then [src, src + n) moved to dst (as memmove does):
    the new watermark is exactly where the first stale slot now is."""
    cap = 50
    valid = np.arange(cap) < h
    moved = valid.copy()
    moved[dst: dst + n] = valid[src: src + n]
    want = int(np.argmin(moved)) if not moved.all() else cap
    assert kv_mirror.moved(h, src, dst, n) == want


def _reads_as_cast(kv, n, dtype=torch.bfloat16):
    for i in range(kv.shape[0]):
        K, V = kv.layer_as(i, n, dtype)
        k, v = kv.layer(i, n)
        if not (torch.equal(K, k.to(dtype)) and torch.equal(V, v.to(dtype))):
            return False
    return True


def test_an_edit_and_a_fork_reach_a_held_mirror(tiny_engine):
    """Keys rotated by an edit (Region._rotate) and K/V copied in by a fork are not the mirror's."""
    text = excerpt(stdlib_source(), 100, 30)
    doc = Document(tiny_engine, "file:///m/a.py", text, "lazy", kv=tiny_engine.new_cache(1024))
    doc.settle()
    kv = doc.kv
    with kv.mirrored():
        assert _reads_as_cast(kv, doc.region.end)
        doc.edit((2, 0), (2, 0), "x = 1\n")        # lazy: the keys after line 2 keep a pending delta
        assert _reads_as_cast(kv, doc.region.end)
        assert doc.compact() > 0                   # ... rotated now, in place
        assert _reads_as_cast(kv, doc.region.end)
        other = tiny_engine.new_cache(2048)  # room enough: no growth to reset the mirror
        with other.mirrored():
            other.layer_bf16(0, 64)
            doc.copy("file:///m/b.py", "pie", kv=other)
            assert _reads_as_cast(other, other.top)


def test_an_encode_in_chunks_at_bf16_keeps_the_same_kv_with_the_mirror(tiny_engine, monkeypatch):
    """The mirror is a cache of casts: the K/V an encode writes are the same without it."""
    text = excerpt(stdlib_source(), 400, 40)
    docs = {}
    used = []
    real = KVCache.layer_bf16

    def spy(self, i, n):
        used.append(torch.bfloat16 in self.mirrors)
        return real(self, i, n)

    monkeypatch.setattr(KVCache, "layer_bf16", spy)
    # attention in bf16, as on a CPU with AMX, whatever this one has (quant.fused_bf16_attention)
    monkeypatch.setattr(tiny_engine.model.precision, "bf16_attention", True)
    for mirror in (True, False):
        if not mirror:
            monkeypatch.setattr(KVCache, "mirrored", lambda self: contextlib.nullcontext())
        doc = Document(tiny_engine, f"file:///m/{mirror}.py", text, "pie", kv=tiny_engine.new_cache(2048))
        doc.configure(precision="bf16", encode_chunk=64)
        doc.settle()
        docs[mirror] = doc
    assert docs[True].n > 256 and any(used) and not all(used)
    s1, s2 = docs[True].region.slots(), docs[False].region.slots()
    assert torch.equal(docs[True].kv.k[:, :, s1], docs[False].kv.k[:, :, s2])
    assert torch.equal(docs[True].kv.v[:, :, s1], docs[False].kv.v[:, :, s2])
    assert not docs[True].kv.mirrors  # the settle let go of it


def test_without_fused_bf16_attention_a_bf16_encode_attends_in_fp32(tiny_engine, monkeypatch):
    """Where torch's fused attention is no faster in bf16 (no AMX), a bf16 encode's projections
    round to bf16 and its attention reads the fp32 cache: no bf16 copy, and K/V as with bf16
    attention to within bf16's rounding."""
    text = excerpt(stdlib_source(), 300, 40)
    used, real = [], KVCache.layer_bf16

    def spy(self, i, n):
        used.append(i)
        return real(self, i, n)

    monkeypatch.setattr(KVCache, "layer_bf16", spy)
    docs = {}
    for fused in (False, True):
        monkeypatch.setattr(tiny_engine.model.precision, "bf16_attention", fused)
        doc = Document(tiny_engine, f"file:///m/fused-{fused}.py", text, "pie", kv=tiny_engine.new_cache(2048))
        doc.configure(precision="bf16", encode_chunk=64)
        doc.settle()
        docs[fused] = doc
        assert bool(used) == fused
    s1, s2 = docs[False].region.slots(), docs[True].region.slots()
    k32, k16 = docs[False].kv.k[:, :, s1], docs[True].kv.k[:, :, s2]
    assert not torch.equal(k32, k16)  # the two attentions round differently
    torch.testing.assert_close(k32, k16, rtol=0.05, atol=0.05)
