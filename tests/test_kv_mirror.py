"""The bf16 mirror of a KV cache (KVCache.mirrored): while held, layer_bf16 equals the cache's
K/V cast to bf16 after any sequence of writes, moves, growth and outside changes (hypothesis
state machine); a document's edit (rotated keys) and fork reach it; an encode in chunks at bf16
gives the same K/V with it as without it."""
from __future__ import annotations

import contextlib

import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from livekv.incremental import kv_cache
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

    @rule(i=st.integers(0, L - 1), at=st.integers(0, 60))
    def outside_change(self, i, at):
        """A writer outside the cache's methods (Region's rotations) says so."""
        if at < self.kv.capacity:
            self.kv.k[i, :, at] += 1.0
            self.kv.changed()

    @rule()
    def let_go_and_hold_again(self):
        """Writes while nobody holds it are not the copy's either."""
        self.hold.__exit__(None, None, None)
        assert self.kv._mirror is None
        self.write_run(0, 0, 4)
        self.hold = self.kv.mirrored()
        self.hold.__enter__()

    @rule(i=st.integers(0, L - 1), n=st.integers(1, 120))
    def read(self, i, n):
        n = min(n, self.kv.capacity)
        K, V = self.kv.layer_bf16(i, n)
        k, v = self.kv.layer(i, n)
        assert torch.equal(K, k.to(torch.bfloat16)) and torch.equal(V, v.to(torch.bfloat16))

    @invariant()
    def every_layer_reads_as_the_cache_cast(self):
        if not hasattr(self, "kv"):
            return
        for i in range(L):
            K, V = self.kv.layer_bf16(i, self.kv.capacity)
            k, v = self.kv.layer(i, self.kv.capacity)
            assert torch.equal(K, k.to(torch.bfloat16)) and torch.equal(V, v.to(torch.bfloat16))

    def teardown(self):
        if hasattr(self, "hold"):
            self.hold.__exit__(None, None, None)
            assert self.kv._mirror is None  # freed with its last holder


TestMirrorMachine = MirrorMachine.TestCase
TestMirrorMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def _reads_as_cast(kv, n):
    for i in range(kv.shape[0]):
        K, V = kv.layer_bf16(i, n)
        k, v = kv.layer(i, n)
        if not (torch.equal(K, k.to(torch.bfloat16)) and torch.equal(V, v.to(torch.bfloat16))):
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
        used.append(self._mirror_users > 0)
        return real(self, i, n)

    monkeypatch.setattr(KVCache, "layer_bf16", spy)
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
    assert docs[True].kv._mirror is None  # the settle let go of it
