"""Key re-rotation kernels against the fp64 reference and against HF's RoPE: properties (shifts
compose and undo, zero deltas keep their bits, norms are kept) and agreement at new positions."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import pytest
from kernel_helpers import (DTYPES, EPS32, PATHS, PROPS, assert_close, bits, inv_freq_for, make, noise, pair_norm,
                            rand_delta, run)
from livekv import kernels
from livekv.kernels.rope import rotation_angles


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


@PROPS
@given(c=cases(), block=st.integers(1, 6))
def test_the_torch_path_in_blocks_is_the_whole_rotation_bit_for_bit(c, block):
    """The CPU path rotates layer by layer, ROTATE_BLOCK tokens at a time (for the CPU's cache):
    any block size gives the bits of one block over every token, and the reference's values."""
    from livekv.kernels import rerotate_torch
    k, delta, inv, kw = draw_case(c)
    pos = c["positions"]
    whole, blocked = k.clone(), k.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rerotate_torch, "ROTATE_BLOCK", 1 << 30)
        rerotate_torch.rerotate_keys_torch_(whole, delta, inv, positions=pos, **kw)
        mp.setattr(rerotate_torch, "ROTATE_BLOCK", block)
        rerotate_torch.rerotate_keys_torch_(blocked, delta, inv, positions=pos, **kw)
    assert torch.equal(bits(blocked), bits(whole))
    ref = kernels.rerotate_keys_reference(k, delta, inv, positions=pos, **kw)
    assert_close(blocked, ref, pair_norm(k, c["rotary_dim"], c["interleaved"]), c["dtype"])


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
