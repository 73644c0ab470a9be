"""Weight formats (quant.py): a block already on a grid of a few levels (GGUF's Q4_1, Q4_K, Q5_0,
Q8_0, dequantized to fp32) is found again exactly, with fp16 steps kept fp16; blocks on no grid
are marked inexact; each format's matmul is the weight's, to bf16 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from livekv.incremental.quant import GROUP, Bf16, Bf16Gated, Int4, Int8, Int8Channels, grid, native_bf16

NEEDS = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no int4 CPU kernel use here")


def gguf_like(kind: str, seed: int, n: int = 32, k: int = 128, gaps: bool = False) -> torch.Tensor:
    """(n, k) fp32 weights as llama.cpp's dequantization leaves them: per block of 32, fp16
    d (and m) times integer levels, computed in fp32. gaps: only even levels are used (bar
    Q5_0's and Q8_0's extreme one), so no two values are one step apart."""
    g = torch.Generator().manual_seed(seed)
    blocks = (n, k // GROUP, 1)
    d = (torch.rand(blocks, generator=g) * 0.02 + 1e-4).half().float()
    span = {"q4_1": (0, 16), "q4_k": (0, 16), "q5_0": (0, 32), "q8_0": (-127, 128)}[kind]
    q = torch.randint(*span, (n, k // GROUP, GROUP), generator=g).float()
    if gaps:
        q -= q.remainder(2) * q.sign()  # towards 0: Q8_0 never stores -128
    if kind == "q4_1":
        return (q * d + (torch.randn(blocks, generator=g) * 0.03).half().float()).reshape(n, k)
    if kind == "q4_k":  # the step is an fp16 d times a 6-bit scale: not an fp16 value itself
        sc, m = (torch.randint(1, 64, blocks, generator=g).float() for _ in range(2))
        return ((d * sc / 64) * q - d * m / 8).reshape(n, k)
    if kind == "q5_0":  # the largest magnitude sits at level 0 (-16 d), as llama.cpp quantizes
        q[..., 0] = 0
        return ((q - 16) * d * torch.where(torch.rand(blocks, generator=g) < 0.5, -1.0, 1.0)).reshape(n, k)
    q[..., 0] = 127
    return (q * d).reshape(n, k)


@given(kind=st.sampled_from(["q4_1", "q4_k", "q5_0", "q8_0"]), seed=st.integers(0, 10_000), gaps=st.booleans())
@settings(max_examples=40, deadline=None)
def test_a_gguf_block_is_found_again_on_its_grid(kind, seed, gaps):
    w = gguf_like(kind, seed, gaps=gaps)
    levels = 16 if kind in ("q4_1", "q4_k") else 256
    lo, s, u, exact = grid(w, levels)
    assert exact == 1.0
    assert u.min() >= 0 and u.max() <= levels - 1 and torch.equal(u, u.round())
    err = (lo + s * u - w.view(u.shape)).abs()
    assert (err <= 2e-4 * s).all(), (err / s).max()  # on the grid, to fp32 rounding
    if kind in ("q4_1", "q5_0", "q8_0"):  # the file's steps were fp16: they stay so
        assert torch.equal(s.half().float(), s)
    q = u.reshape(-1, GROUP).to(torch.int64)  # the coarsest grid through the levels: no common factor
    g = q[:, 0]
    for j in range(1, GROUP):
        g = torch.gcd(g, q[:, j])
    assert (g == 1).all()


@given(seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_weights_on_no_grid_are_marked_inexact_and_rounded_within_half_a_step(seed):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
    for levels in (16, 256):
        lo, s, u, exact = grid(w, levels)
        assert exact == 0.0
        err = ((lo + s * u).reshape(w.shape) - w).abs().view(16, -1, GROUP)
        assert (err <= s * 0.5 + 1e-6).all()


def test_the_share_of_blocks_on_a_grid_is_counted_block_by_block():
    w = gguf_like("q8_0", 3, n=32, k=128)
    w[:8] = torch.randn(8, 128) * 0.02          # a quarter of the rows on no grid
    w[8, :GROUP] += 1e-3 * torch.rand(GROUP)    # and one more block, nudged off its grid
    assert grid(w, 256)[3] == pytest.approx(1 - (8 * 4 + 1) / (32 * 4))


@NEEDS
@pytest.mark.parametrize("kind", ["q4_1", "q4_k", "q5_0", "q8_0", "none"])
def test_each_format_multiplies_as_the_weight_to_bf16_rounding(kind):
    w = gguf_like(kind, 7, n=64, k=256) if kind != "none" else torch.randn(64, 256) * 0.02
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = x.float() @ w.t()
    scale = ref.abs().max().item()
    on_4bit = kind in ("q4_1", "q4_k")
    i8, i4 = Int8.of(w), Int4.of(w)
    assert i8.exact == (kind != "none") and i4.exact == on_4bit  # the share of blocks: all or none
    # exact blocks: bf16 scales and outputs only (about 2^-8 relative); lossy ones: the grid's step
    assert (i8.mm(x).float() - ref).abs().max() <= (0.01 if i8.exact else 0.03) * scale
    assert (i4.mm(x).float() - ref).abs().max() <= (0.01 if i4.exact else 0.3) * scale
    assert (Int8Channels.of(w).mm(x).float() - ref).abs().max() <= 0.03 * scale
    if kind == "q8_0":  # one scale per row loses what the blocks keep
        assert (Int8Channels.of(w).mm(x).float() - ref).abs().max() > (i8.mm(x).float() - ref).abs().max()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 96), k=st.integers(1, 200), rows=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_bf16_weights_multiply_exactly_as_the_plain_bf16_copy(n, k, rows, seed):
    """Packed for oneDNN or not, the bf16 format's products are F.linear's on w.bfloat16(), bit
    for bit, for any shape and any number of rows."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g).bfloat16()
    b = Bf16.of(w)
    assert b.packed == native_bf16(torch.device("cpu"))
    assert torch.equal(b.mm(x), torch.nn.functional.linear(x, w.bfloat16()))


@NEEDS
@settings(max_examples=25, deadline=None)
@given(i=st.integers(1, 64), k=st.integers(1, 200), rows=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_the_gated_mlp_in_bf16_is_silu_of_the_gate_times_up_to_bf16_rounding(i, k, rows, seed):
    """Bf16Gated: its product is the fused (2I, K) bf16 weight's, bit for bit; its swiglu is
    silu(x gate^T) * (x up^T) of the bf16 operands in fp32, to two bf16 roundings (the SiLU's
    output, the product)."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(2 * i, k, generator=g) * 0.1, torch.randn(rows, k, generator=g).bfloat16()
    b = Bf16Gated.of(w)
    assert torch.equal(b.mm(x), torch.nn.functional.linear(x, w.bfloat16()))
    gate, up = (x.float() @ w.bfloat16().float().t()).chunk(2, -1)
    ref = torch.nn.functional.silu(gate) * up                                     # (rows, I)
    out = b.swiglu(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    bound = 2 ** -7 * ref.abs() + 1e-5 * (x.float().abs() @ w.abs().t()).chunk(2, -1)[1]
    assert ((out.float() - ref).abs() <= bound).all()


def snapped(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w's blocks rounded as llama.cpp quantizes them (Q8_0: d * q, q in -127..127; Q4_1:
    m + d * q, q in 0..15; fp16 d and m), dequantized to fp32."""
    b = w.float().reshape(-1, GROUP)
    if kind == "q8_0":
        d = (b.abs().amax(-1, keepdim=True) / 127).half().float().clamp_min(1e-8)
        return ((b / d).round().clamp(-127, 127) * d).reshape(w.shape)
    m = b.amin(-1, keepdim=True).half().float()
    d = ((b.amax(-1, keepdim=True) - m) / 15).half().float().clamp_min(1e-8)
    return ((b - m).div(d).round().clamp(0, 15) * d + m).reshape(w.shape)


@pytest.mark.parametrize("rest, down, blocks", [
    ("q4_1", "q4_1", "int4"),  # a Q4_1 GGUF, as the embedded model
    ("q8_0", "q8_0", "int8"),  # Q8_0 (or Q5_0) throughout
    ("q8_0", None, "int8"),    # the down projections (22% here) on no grid, as the coder's Q6_K ones
    (None, "q8_0", None),      # only they are on one: int8 would not be the file's weights
    (None, None, None),        # fp32 weights (a HF checkpoint)
])
def test_auto_picks_the_block_format_that_reproduces_most_of_the_weights(tiny_engine, rest, down, blocks):
    from livekv.incremental.precision import Precision, native_bf16
    hf = copy.deepcopy(tiny_engine.model.hf)
    for layer in hf.model.layers:
        for name, lin in layer.named_modules():
            kind = down if name.endswith("down_proj") else rest
            if isinstance(lin, torch.nn.Linear) and kind:
                lin.weight.data = snapped(lin.weight.data, kind)
    P = Precision(hf)
    assert P.blocks() == blocks
    assert P.resolve("auto") == ((blocks or "bf16") if native_bf16(torch.device("cpu")) else "fp32")
    kept = {m for proj in P._projs() for m in proj._formats}
    assert kept <= ({blocks} if blocks else set()), kept  # formats made to decide and not chosen are gone


@pytest.mark.parametrize("precision, rows, batched, mode", [
    ("int4", 1, False, "int4"), ("int4", 15, False, "int4"), ("int4", 16, False, "bf16"),
    ("int4", 5, True, "int4"), ("int4", 6, True, "bf16"),
    ("int8", 2, False, "int8"), ("int8", 3, False, "bf16"), ("int8", 2, True, "int8"), ("int8", 3, True, "bf16"),
    ("bf16", 1, False, "fp32"), ("bf16", 16, False, "bf16"), ("fp32", 16, True, "fp32"),
])
def test_each_pass_reads_the_weight_format_its_rows_run_fastest_at_its_precision(tiny_engine, precision, rows, batched,
                                                                                 mode):
    """int8 blocks run the int4 kernel on twice the rows, so bf16 takes over from INT8_ROWS;
    int4 holds to SMALL rows alone and BATCH_BF16 in a batch; bf16's decode steps read fp32."""
    from livekv.incremental.precision import BATCH_BF16, INT8_ROWS, SMALL
    assert (INT8_ROWS, BATCH_BF16, SMALL) == (3, 6, 16)  # the table above is written for these
    P = tiny_engine.model.precision
    try:
        P.set(precision, rows, batched)
        assert P.mode == mode
    finally:
        P.set("fp32", 1)
