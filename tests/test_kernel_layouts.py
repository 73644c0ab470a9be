"""Key re-rotation kernels on every shape and layout a cache hands them (views, partial rotary,
slots, per-row deltas), their preconditions, and which path runs where."""

import os
import subprocess
import sys

import pytest
import torch

from kernel_helpers import (DTYPES, HAS_TRITON, PATHS, assert_close, inv_freq_for, make, needs_cuda, pair_norm,
                            rand_delta, run)
from livekv import kernels


# ---------------------------------------------------------------- shapes, layouts, options

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,D,T", [(h, d, t) for h in (1, 3, 8) for d in (64, 80, 128) for t in (13, 217)])
def test_shapes(path, dtype, H, D, T):
    k = make((2, H, T, D), dtype, "cpu", seed=H * D + T)
    if T < 100:  # scattered shifts
        delta = rand_delta((T,), T)
    else:  # an edit at token 70: everything after it moves by the same amount
        delta = torch.where(torch.arange(T) >= 70, -9, 0)
    inv = inv_freq_for(D)
    ref = kernels.rerotate_keys_reference(k, delta, inv)
    assert_close(run(path, k, delta, inv), ref, pair_norm(k, D, False), dtype)


def layouts():
    """(name, buffer, view_fn): the view rotated in place inside a larger buffer."""
    L, H, cap, D = 3, 2, 40, 64
    return [
        # engine layout: all layers of an (L, H, capacity, D) buffer, a window of tokens
        ("slice", (L, H, cap, D), lambda buf: buf[:, :, 11:28]),
        # storage (B, T, H, D) seen as (B, H, T, D)
        ("transposed", (L, cap, H, D), lambda buf: buf.transpose(1, 2)[:, :, 5:22]),
        # head dim not unit-stride: storage (D, L, H, T)
        ("d-major", (D, L, H, cap), lambda buf: buf.permute(1, 2, 3, 0)[:, :, 3:20]),
        # every other head of a wider buffer
        ("head-strided", (L, 2 * H, cap, D), lambda buf: buf[:, ::2, 7:24]),
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", layouts(), ids=lambda x: x[0])
def test_views_in_place(path, dtype, layout):
    fn, device = path
    _, shape, view_fn = layout
    buf = make(shape, dtype, device, seed=11)
    before = buf.clone()
    v = view_fn(buf)
    ptr, T = v.data_ptr(), v.shape[2]
    delta = rand_delta((T,), 12).to(device)
    pos = torch.randint(0, 5000, (T,), generator=torch.Generator().manual_seed(13)).to(device)
    inv = inv_freq_for(v.shape[-1]).to(device)
    ref = kernels.rerotate_keys_reference(view_fn(before).cpu(), delta.cpu(), inv.cpu(), positions=pos.cpu())
    assert fn(v, delta, inv, positions=pos) is v and v.data_ptr() == ptr
    assert_close(v.cpu(), ref, pair_norm(view_fn(before).cpu(), v.shape[-1], False), dtype)
    inside = torch.zeros(shape, dtype=torch.bool, device=device)
    view_fn(inside).fill_(True)
    assert torch.equal(buf[~inside], before[~inside])  # neighbours outside the view untouched


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 32), (80, 16), (128, 64)])
def test_partial_rotary(path, interleaved, D, R):
    k = make((2, 3, 13, D), torch.float16, "cpu", seed=D + R)
    delta, pos = rand_delta((13,), 1), torch.arange(13) * 100
    inv = inv_freq_for(R)
    ref = kernels.rerotate_keys_reference(k, delta, inv, positions=pos, interleaved=interleaved, rotary_dim=R)
    out = run(path, k, delta, inv, positions=pos, interleaved=interleaved, rotary_dim=R)
    assert_close(out, ref, pair_norm(k, R, interleaved), torch.float16)
    assert torch.equal(out[..., R:], k[..., R:])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [False, True], ids=["delta(S)", "delta(B,S)"])
def test_slots(path, dtype, batched):
    B, T, S = 2, 29, 11
    k = make((B, 3, T, 64), dtype, "cpu", seed=21)
    g = torch.Generator().manual_seed(22)
    slots = torch.randperm(T, generator=g)[:S]  # scattered, out of order
    shape = (B, S) if batched else (S,)
    delta = rand_delta(shape, 23)
    pos = torch.randint(0, 20000, shape, generator=g)
    inv = inv_freq_for(64)
    ref = kernels.rerotate_keys_reference(k, delta, inv, positions=pos, slots=slots)
    out = run(path, k, delta, inv, positions=pos, slots=slots)
    assert_close(out, ref, pair_norm(k, 64, False), dtype)
    untouched = torch.ones(T, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(out[:, :, untouched], k[:, :, untouched])
    # slot s really takes delta[s]: rotating the gathered slots as a plain cache agrees
    plain = run(path, k[:, :, slots].contiguous(), delta, inv, positions=pos)
    assert torch.equal(out[:, :, slots], plain)


@pytest.mark.parametrize("path", PATHS)
def test_per_row_delta(path):
    B, T = 3, 17
    k = make((B, 2, T, 64), torch.float32, "cpu", seed=31)
    delta = rand_delta((B, T), 32, zero_frac=0.5)
    delta[1] = 0  # a whole batch row (layer) not moving
    inv = inv_freq_for(64)
    ref = kernels.rerotate_keys_reference(k, delta, inv)
    out = run(path, k, delta, inv)
    assert_close(out, ref, pair_norm(k, 64, False), torch.float32)
    assert torch.equal(out[1], k[1])
    for b in (0, 2):  # row b is rotated by its own delta, not by another row's
        assert_close(out[b:b + 1], kernels.rerotate_keys_reference(k[b:b + 1], delta[b], inv),
                     pair_norm(k[b:b + 1], 64, False), torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", ["odd_rotary", "rotary_gt_d", "inv_len", "float_delta", "delta_shape",
                                 "pos_shape", "inv_dtype", "k_3d", "slots_dtype", "int_k"])
def test_preconditions(path, bad):
    fn, device = path
    k = torch.zeros(2, 1, 5, 8, device=device)
    args = dict(k=k, delta=torch.ones(5, dtype=torch.int64, device=device), inv_freq=inv_freq_for(8).to(device))
    kw = {}
    if bad == "odd_rotary":
        kw["rotary_dim"] = 3
    elif bad == "rotary_gt_d":
        kw["rotary_dim"], args["inv_freq"] = 10, inv_freq_for(10).to(device)
    elif bad == "inv_len":
        args["inv_freq"] = inv_freq_for(6).to(device)
    elif bad == "float_delta":
        args["delta"] = args["delta"].float()
    elif bad == "delta_shape":
        args["delta"] = args["delta"][:4]
    elif bad == "pos_shape":
        kw["positions"] = torch.zeros(2, 5, dtype=torch.int64, device=device)
    elif bad == "inv_dtype":
        args["inv_freq"] = args["inv_freq"].double()
    elif bad == "k_3d":
        args["k"] = k[0]
    elif bad == "slots_dtype":
        kw["slots"] = torch.arange(5, dtype=torch.int32, device=device)
    elif bad == "int_k":
        args["k"] = k.long()
    with pytest.raises(AssertionError):
        fn(args["k"], args["delta"], args["inv_freq"], **kw)


# ---------------------------------------------------------------- dispatch

def test_dispatch_uses_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "rerotate_keys_triton_", lambda *a, **kw: pytest.fail("Triton on CPU"))
    real = kernels.rerotate_keys_torch_
    monkeypatch.setattr(kernels, "rerotate_keys_torch_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k = make((2, 3, 13, 64), torch.float32, "cpu")
    delta, inv = rand_delta((13,), 0), inv_freq_for(64)
    ref = kernels.rerotate_keys_reference(k, delta, inv)
    assert kernels.rerotate_keys_(k, delta, inv) is k and calls == [1]
    assert_close(k, ref, pair_norm(ref, 64, False), torch.float32)


def test_cpu_dispatch_does_not_import_triton():
    code = ("import sys, torch\nfrom livekv import kernels\n"
            "k = torch.randn(1, 1, 4, 8)\n"
            "kernels.rerotate_keys_(k, torch.ones(4, dtype=torch.int64), torch.ones(4))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    env = {kk: v for kk, v in os.environ.items() if kk != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_dispatch_uses_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "rerotate_keys_torch_", lambda *a, **kw: pytest.fail("torch path on CUDA"))
    k = make((30, 3, 257, 64), torch.bfloat16, "cuda")
    delta, inv = rand_delta((257,), 0), inv_freq_for(64)
    ref = kernels.rerotate_keys_reference(k.cpu(), delta, inv)
    kernels.rerotate_keys_(k, delta.cuda(), inv.cuda())
    assert_close(k.cpu(), ref, pair_norm(ref, 64, False), torch.bfloat16)


@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_offsets_past_int32_on_cuda():
    # a 2**31 + element buffer: element offsets of the last tokens overflow int32
    D = 64
    cap = 2**31 // D + 64
    buf = torch.zeros(1, 1, cap, D, dtype=torch.bfloat16, device="cuda")
    buf[:, :, -96:] = make((1, 1, 96, D), torch.bfloat16, "cuda", seed=41)
    v = buf[:, :, -64:]
    before = buf[:, :, -96:].cpu()
    delta, inv = rand_delta((64,), 42, zero_frac=0), inv_freq_for(D)
    ref = kernels.rerotate_keys_reference(before[:, :, -64:], delta, inv)
    kernels.rerotate_keys_triton_(v, delta.cuda(), inv.cuda())
    assert_close(v.cpu(), ref, pair_norm(ref, D, False), torch.bfloat16)
    assert torch.equal(buf[:, :, -96:-64].cpu(), before[:, :, :32])
    assert not buf[:, :, :-96].any()
    del buf
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotated_keys_is_a_rotated_copy_of_some_columns(dtype):
    """What attention over pending deltas uses: the cache itself is left as it was."""
    k = make((2, 3, 40, 64), dtype, "cpu")
    before = k.clone()
    slots = torch.tensor([3, 4, 5, 17, 30], dtype=torch.int64)
    delta, pos, inv = rand_delta((5,), 1), torch.arange(5) * 7, inv_freq_for(64)
    got = kernels.rotated_keys(k, slots, delta, inv, positions=pos)
    ref = kernels.rerotate_keys_reference(k[:, :, slots], delta, inv, positions=pos)
    assert got.shape == (2, 3, 5, 64) and torch.equal(k, before)
    assert_close(got, ref, pair_norm(ref, 64, False), dtype)
