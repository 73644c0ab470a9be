"""Key re-rotation kernels against the fp64 reference and against HF's RoPE.

Without a GPU the Triton kernel runs under the Triton interpreter on CPU
tensors; with one, the same tests run it compiled on CUDA. Tolerances come
from the dtype's rounding (see noise()), not from hand-picked constants.
"""

import importlib.util
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of the kernel module (and of transformers)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from livekv import kernels  # noqa: E402
from livekv.kernels.rope import pair_index, rotation_angles  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # interpreter on CPU
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

PATHS = [pytest.param((kernels.rerotate_keys_torch_, d), id=f"torch-{d}") for d in DEVICES] + [
    pytest.param((kernels.rerotate_keys_triton_, TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}",
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
PROPS = settings(max_examples=25, deadline=None)


def inv_freq_for(rotary_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def pair_norm(x, rotary_dim, interleaved):
    """|(x_i1, x_i2)| at both members of each rotating pair, |x| past rotary_dim. fp64."""
    x = x.double()
    i1, i2 = pair_index(rotary_dim, interleaved)
    out = x.abs()
    n = (x[..., i1] ** 2 + x[..., i2] ** 2).sqrt()
    out[..., i1], out[..., i2] = n, n
    return out


def noise(pn, dtype, roundings=1):
    """Worst-case error of `roundings` fp32 rotations each stored once in `dtype`.

    Per rotation: half an ulp of dtype at the pair's magnitude for the store, a few fp32
    ulps for the cos/sin tables, two products and a sum, plus half the smallest
    subnormal for values that land below dtype's normal range.
    """
    fi = torch.finfo(dtype)
    per = (fi.eps / 2 + 4 * EPS32) * pn + fi.smallest_normal * fi.eps / 2
    return roundings * per


def assert_close(out, ref, pn, dtype, roundings=1):
    err = (out.double() - ref.double()).abs()
    tol = noise(pn, dtype, roundings)
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst err/tol {(err / tol).max().item():.3g}"


def bits(x):
    """Integer view of a float tensor: compares NaNs and -0.0 exactly."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def rand_delta(shape, seed, lo=-50, hi=50, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.randint(lo, hi + 1, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < zero_frac, 0, d)


def run(path, k, delta, inv_freq, **kw):
    """Apply a path to a clone of k (moved to the path's device); returns the result on CPU."""
    fn, device = path
    kk = k.to(device).clone()
    ptr = kk.data_ptr()
    dev_kw = {n: (v.to(device) if torch.is_tensor(v) else v) for n, v in kw.items()}
    assert fn(kk, delta.to(device), inv_freq.to(device), **dev_kw) is kk
    assert kk.data_ptr() == ptr
    return kk.cpu()


# ---------------------------------------------------------------- properties (hypothesis)

@st.composite
def cases(draw):
    B, H, T = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 19))
    D = draw(st.sampled_from([8, 16, 40, 64]))
    R = draw(st.sampled_from(sorted({D, max(2, D // 2), 2})))
    two_d = draw(st.booleans())
    dshape = (B, T) if two_d else (T,)
    c = dict(shape=(B, H, T, D), rotary_dim=R, dtype=draw(st.sampled_from(DTYPES)),
             interleaved=draw(st.booleans()), seed=draw(st.integers(0, 2**20)), dshape=dshape)
    c["positions"] = (torch.randint(0, 20000, dshape, generator=torch.Generator().manual_seed(c["seed"] + 2))
                      if draw(st.booleans()) else None)
    return c


def draw_case(c):
    k = make(c["shape"], c["dtype"], "cpu", c["seed"])
    kw = dict(interleaved=c["interleaved"], rotary_dim=c["rotary_dim"])
    return k, rand_delta(c["dshape"], c["seed"]), inv_freq_for(c["rotary_dim"]), kw


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(c=cases())
def test_matches_reference(path, c):
    k, delta, inv, kw = draw_case(c)
    ref = kernels.rerotate_keys_reference(k, delta, inv, positions=c["positions"], **kw)
    out = run(path, k, delta, inv, positions=c["positions"], **kw)
    assert_close(out, ref, pair_norm(k, c["rotary_dim"], c["interleaved"]), c["dtype"])
    assert torch.equal(out[..., c["rotary_dim"]:], k[..., c["rotary_dim"]:])  # past rotary_dim: untouched


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(c=cases())
def test_zero_delta_is_bit_exact(path, c):
    k, delta, inv, kw = draw_case(c)
    # values a "rotate by 0" (x * 1 - y * 0) would not return unchanged: zero delta must not compute
    flat = k.view(-1)
    flat[0::7], flat[3::11] = float("nan"), -0.0
    out = run(path, k, delta, inv, positions=c["positions"], **kw)
    still = (delta == 0).expand(k.shape[0], k.shape[2])[:, None, :, None].expand_as(k)
    assert torch.equal(bits(out[still]), bits(k[still]))
    out0 = run(path, k, torch.zeros_like(delta), inv, positions=c["positions"], **kw)
    assert torch.equal(bits(out0), bits(k))


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(c=cases())
def test_shift_and_back(path, c):
    k, delta, inv, kw = draw_case(c)
    pos = c["positions"]
    there = run(path, k, delta, inv, positions=pos, **kw)
    back = run(path, there, -delta, inv, positions=None if pos is None else pos + delta, **kw)
    assert_close(back, k, pair_norm(k, c["rotary_dim"], c["interleaved"]), c["dtype"], roundings=2)


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(c=cases())
def test_shifts_compose(path, c):
    k, a, inv, kw = draw_case(c)
    b = rand_delta(c["dshape"], c["seed"] + 7)
    pos = c["positions"]
    ref = kernels.rerotate_keys_reference(k, a + b, inv, positions=pos, **kw)
    two = run(path, run(path, k, a, inv, positions=pos, **kw), b, inv,
              positions=None if pos is None else pos + a, **kw)
    assert_close(two, ref, pair_norm(k, c["rotary_dim"], c["interleaved"]), c["dtype"], roundings=2)


@PROPS
@given(p=st.integers(0, 2**20), a=st.integers(-5000, 5000), b=st.integers(-5000, 5000),
       base=st.sampled_from([1e4, 5e5, 1e6]))
def test_angles_telescope_exactly(p, a, b, base):
    # with positions the angles are differences of HF's fp32 products, so a shift by a then b
    # lands on the same angle as a shift by a + b bit for bit: no drift over any number of edits
    inv = inv_freq_for(64, base)
    pos, a, b = torch.tensor([p]), torch.tensor([a]), torch.tensor([b])
    two = rotation_angles(a, inv, pos) + rotation_angles(b, inv, pos + a)
    assert torch.equal(two, rotation_angles(a + b, inv, pos))
    hf_new = ((pos + a + b).float()[:, None] * inv).double()  # HF's angle at the new position
    assert torch.equal(((pos.float()[:, None] * inv).double() + two), hf_new)


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(c=cases())
def test_pair_norms_preserved(path, c):
    k, delta, inv, kw = draw_case(c)
    out = run(path, k, delta, inv, positions=c["positions"], **kw)
    R = c["rotary_dim"]
    pn = pair_norm(k, R, c["interleaved"])
    err = (pair_norm(out, R, c["interleaved"]) - pn).abs()
    assert (err <= 2 * noise(pn, c["dtype"])).all()  # each member off by at most noise


# ---------------------------------------------------------------- agreement with HF Llama RoPE

ROPE_CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}


def hf_rope(name, head_dim=64):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                      max_position_embeddings=32768, rope_parameters=dict(ROPE_CONFIGS[name]))
    emb = LlamaRotaryEmbedding(cfg)

    def encode(k, pos):  # k (B, H, T, D) unrotated, pos (B, T): HF's own key encoding
        cos, sin = emb(k, pos)
        return apply_rotary_pos_emb(k, k, cos, sin)[1]
    return emb.inv_freq, encode


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_matches_hf_at_new_position(path, name):
    inv, encode = hf_rope(name)
    B, T = 2, 37
    raw = make((B, 2, T, 64), torch.float32, "cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    pos = torch.randint(0, 20000, (B, T), generator=g)
    delta = torch.randint(-3000, 3000, (B, T), generator=g)
    target = encode(raw, pos + delta)
    out = run(path, encode(raw, pos), delta, inv, positions=pos)
    scale = target.abs().max()
    assert (out - target).abs().max() <= 8 * EPS32 * scale  # ~1e-6 relative: fp32 noise of both sides
    # without positions the angle is exact delta * theta, but HF's angle at p + delta carries
    # fp32 rounding of theta * p; this is what positions= buys, and shows the check has teeth
    loose = run(path, encode(raw, pos), delta, inv)
    assert (loose - target).abs().max() > 64 * EPS32 * scale


@pytest.mark.parametrize("path", PATHS)
def test_many_edits_do_not_drift(path):
    inv, encode = hf_rope("default")
    raw = make((1, 1, 4, 64), torch.float32, "cpu", seed=5)
    pos = torch.tensor([[100, 5000, 12000, 19000]])
    k = encode(raw, pos)
    g = torch.Generator().manual_seed(6)
    steps = 1000 if path[0] is kernels.rerotate_keys_torch_ else 100  # the interpreter is slow
    for _ in range(steps):
        d = torch.randint(-40, 41, (1, 4), generator=g)
        d = torch.where(pos + d < 0, -d, d)
        k = run(path, k, d, inv, positions=pos)
        pos = pos + d
    target = encode(raw, pos)
    # per step ~ a few fp32 ulps of noise accumulate as a random walk (sqrt(steps));
    # a systematic angle error (drift) would grow with steps instead
    assert (k - target).abs().max() <= 8 * EPS32 * steps ** 0.5 * target.abs().max()


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
    code = ("import sys, torch, kernels\n"
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
