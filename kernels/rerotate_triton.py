"""Triton re-rotation kernel: the CUDA path.

Importing this module imports triton. Set TRITON_INTERPRET=1 before the first
import to run it on CPU tensors (that is how the tests run without a GPU).

Like flash-attention's rotary kernel, cos/sin come from precomputed fp32
tables (taken in fp64 by rope.rotation_tables): no in-kernel transcendental
has to be accurate at angles of 10^4 radians. The kernel is pure bandwidth:
load a key pair, upcast, two FMAs, one rounding on store.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .rope import check_args, rotation_tables


@triton.jit
def _fp32_to_bf16_rtne(y):
    # Round-to-nearest-even by hand: the interpreter's fp32 -> bf16 cast truncates, which
    # would double the bf16 error under test; on GPU this matches cvt.rn for every non-NaN.
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    bits = tl.where(y == y, bits, 0x7FC0)  # NaN stays NaN (the carry could corrupt it)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store(ptr, y, mask):
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _fp32_to_bf16_rtne(y), mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rerotate_kernel(
    K, DELTA, COS, SIN, SLOTS,
    H, N, HALF,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_db, stride_dt,  # delta: stride_db is 0 when delta is (N,)
    stride_cb, stride_ct,  # cos/sin tables, (Bt, N, HALF) contiguous; stride_cb 0 when shared
    HAS_SLOTS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # grid (B, token blocks): b varies fastest, so programs running together share a
    # table block in L2; the head loop reuses it from registers
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,)
    p = tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,) pair index
    n_ok = n < N

    d = tl.load(DELTA + b * stride_db + n * stride_dt, mask=n_ok, other=0)
    # delta 0 rows are neither rotated nor stored: their bits stay exactly as they were
    row_ok = n_ok & (d != 0)
    if HAS_SLOTS:
        t = tl.load(SLOTS + n, mask=row_ok, other=0).to(tl.int64)
    else:
        t = n
    mask = row_ok[:, None] & (p < HALF)[None, :]  # (BLOCK_T, BLOCK_P)

    tab = b * stride_cb + n[:, None] * stride_ct + p[None, :]
    cos = tl.load(COS + tab, mask=mask, other=1.0)
    sin = tl.load(SIN + tab, mask=mask, other=0.0)

    if INTERLEAVED:
        c1 = 2 * p
        c2 = 2 * p + 1
    else:
        c1 = p
        c2 = p + HALF
    off1 = t[:, None] * stride_kt + c1[None, :] * stride_kd
    off2 = t[:, None] * stride_kt + c2[None, :] * stride_kd
    kh = K + b * stride_kb
    for _ in range(H):
        # upcast right after the load: fp32 math (the interpreter's bf16 arithmetic is wrong)
        x1 = tl.load(kh + off1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(kh + off2, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        _store(kh + off1, y1, mask)  # one rounding, fp32 -> k's dtype
        _store(kh + off2, y2, mask)
        kh += stride_kh  # pointer steps: no h * stride product to overflow int32


def rerotate_keys_triton_(k, delta, inv_freq, *, positions=None, interleaved=False,
                          rotary_dim=None, slots=None):
    """Rotate cached keys in place by per-token position shifts (Triton kernel).

    Same contract as kernels.rerotate_keys_: k (B, Hkv, T, D) with any strides,
    delta (N,) or (B, N) with N = T or len(slots), optional positions of
    delta's shape, fp32 inv_freq (rotary_dim/2,). Slots must be unique and in
    range (not checked: that would cost a device sync). Returns k.
    """
    n_tok, R = check_args(k, delta, inv_freq, positions, rotary_dim, slots)
    B, H = k.shape[:2]
    if n_tok == 0 or B == 0 or H == 0:
        return k
    dev = k.device
    delta = delta.to(dev)
    cos, sin = rotation_tables(delta, inv_freq, positions, device=dev)  # (N, R/2) or (B, N, R/2)
    has_slots = slots is not None
    slots = slots.to(dev) if has_slots else delta  # any pointer will do when unused

    half = R // 2
    block_p = triton.next_power_of_2(half)
    block_t = max(1, min(64, 2048 // block_p))  # ~2k pairs in flight per head per program
    grid = (B, triton.cdiv(n_tok, block_t))
    two_d = delta.dim() == 2
    # launch on k's GPU, not the current one (no-op for CPU tensors under the interpreter)
    on_dev = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_dev:
        _rerotate_kernel[grid](
            k, delta, cos, sin, slots,
            H, n_tok, half,
            *k.stride(),
            delta.stride(0) if two_d else 0, delta.stride(-1),
            cos.stride(0) if two_d else 0, cos.stride(-2),
            HAS_SLOTS=has_slots,
            INTERLEAVED=interleaved,
            BLOCK_T=block_t,
            BLOCK_P=block_p,
        )
    return k
