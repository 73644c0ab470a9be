"""Weight formats for the CPU's matrix multiplies: bf16, int4 and int8 in blocks of 32 along the
input axis, and int8 per output channel for a weight whose shape the blocks do not fit.

bf16 weights are kept in oneDNN's own layout where torch has oneDNN's bf16 matmul (Bf16): the
same products as F.linear on the plain copy, which reorders the weight into that layout on every
call (`livekv bench precision --rows` in the README measures what that saves).

A GGUF model arrives already quantized: llama.cpp stores each block of 32 weights of a row on a
grid of a few levels (Q4_1 and Q4_K: lo + d * q with q in 0..15; Q5_0 and Q8_0: d * q with q in
-16..15 or -127..127), and the GGUF loader hands livekv those values dequantized to fp32. Blocks
here finds each block's grid again (`grid`), so for such a tensor the int4 or int8 weight *is*
the file's weight, bar bf16 scales; any other block is quantized by its min and max, which loses
accuracy. `exact` is the share of blocks found on a grid, and precision.resolve only picks a
format by itself when it reproduces the model (Precision.blocks).

torch's int4 kernel dequantizes w = (q - 8) * scale + zero, with bf16 scales, inputs and outputs
(so d and m round to bf16). Carrying the scales and the inputs in two bf16 parts each (hi + lo)
made each projection nearer fp32 but whole greedy lines no more often equal to fp32's, and a
decode step slower: so one call, as llama.cpp, which rounds its activations too. torch has no
int8 kernel with block scales, so Int8 splits each 8-bit level into two 4-bit halves and runs the
int4 kernel on both at once: the same bytes as int8 per channel, read faster here, with the
file's blocks instead of one scale per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # GGUF's block size, and the int4 kernel's group size here
# How far from an integer level a weight may fall, in steps, and still be on its block's grid: above
# fp32's rounding of a dequantized weight (plus ULPS of the block's largest magnitude, for blocks
# whose offset dwarfs their step: Q4_K), below an fp16 rounding of the step (2^-12) at level 1.
TOL = 1e-4
ULPS = 4 * 2.0 ** -24


def native_bf16(device: torch.device) -> bool:
    """Whether matmuls on this device run bf16 natively through oneDNN (AMX / AVX512-BF16)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fused_bf16_attention(device: torch.device) -> bool:
    """Whether torch's fused CPU attention runs faster in bf16 than in fp32 here: it multiplies
    bf16 blocks on AMX tiles; without AMX (AVX512-BF16 alone) it converts every block to fp32 and
    is no faster, so an encode's attention there stays fp32, and exact (README, "Precision")."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private probe: absent, assume no AMX
    return native_bf16(device) and amx is not None and amx()


def native_fp16(device: torch.device) -> bool:
    """Whether this CPU computes in fp16 natively (AVX512-FP16 / AMX-FP16). Without it torch's
    fused attention converts fp16 per block and runs slower than fp32 (README, "Decode steps
    read an fp16 copy")."""
    mkldnn = torch.backends.mkldnn
    return device.type == "cpu" and mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _linear(x: torch.Tensor, w: torch.Tensor, post: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, post, [], "")


@dataclass
class Bf16:
    """A weight in bf16, reordered once into oneDNN's layout where oneDNN runs bf16 natively."""
    w: torch.Tensor   # (N, K) bf16, in oneDNN's layout when packed
    packed: bool

    @classmethod
    def of(cls, w: torch.Tensor) -> "Bf16":
        b = w.detach().to(torch.bfloat16)
        if native_bf16(b.device):
            return cls(torch.ops.mkldnn._reorder_linear_weight(b), True)
        return cls(b, False)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16."""
        return _linear(x, self.w) if self.packed else torch.nn.functional.linear(x, self.w)


@dataclass
class Bf16Gated:
    """A gated MLP's gate and up weights ((I, K) each, fused as (2I, K) in the model) in bf16.
    Besides their product, swiglu: silu(x gate^T) * (x up^T) in oneDNN's epilogues, SiLU on the
    gate's fp32 sums and the up's fp32 sums times it, rounded to bf16 once each, where the plain
    path rounds gate and up to bf16 first and reads and writes their outputs three times more."""
    gate: Bf16
    up: Bf16

    @classmethod
    def of(cls, w: torch.Tensor) -> "Bf16Gated":
        g, u = w.chunk(2)
        return cls(Bf16.of(g), Bf16.of(u))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, 2I) bf16: gate's outputs, then up's."""
        return torch.cat([self.gate.mm(x), self.up.mm(x)], -1)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> silu(gate) * up, (M, I) bf16. Packed weights only (native_bf16)."""
        assert self.gate.packed and self.up.packed, "swiglu runs in oneDNN's epilogues: packed weights only"
        a = _linear(x, self.gate.w, "swish")
        return torch.ops.mkldnn._linear_pointwise.binary(x, a, self.up.w, None, "mul")


def fits(shape) -> bool:
    """Whether an (N, K) weight has the int4 kernel's tiling: N % 16 and K % GROUP."""
    N, K = shape
    return N % 16 == 0 and K % GROUP == 0


def _min_gap(x: torch.Tensor) -> torch.Tensor:
    """(B, G) -> (B, 1): the smallest positive difference between two values of each row."""
    d = x.sort(-1).values.diff(dim=-1)
    return d.masked_fill(d <= 0, float("inf")).amin(-1, keepdim=True)


def _on_grid(x: torch.Tensor, step: torch.Tensor, span: torch.Tensor, top: torch.Tensor,
             levels: int) -> torch.Tensor:
    """Blocks' values above their least (B, G), candidate steps, spans and largest magnitudes
    (B, 1) -> (B, 1): whether every value is a whole number of steps up, within `levels`."""
    u = x / step
    off = u.sub_(u.round()).abs_().amax(-1, keepdim=True)                 # steps from the nearest level
    return (off <= TOL + ULPS * top / step) & (span / step < levels - 0.5) & torch.isfinite(step)


def grid(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w (N, K) as blocks of GROUP: lo (N, K/G, 1), step s (N, K/G, 1) and levels u (N, K/G, G)
    in 0..levels-1 with w = lo + s * u, and the share of blocks for which that holds. A block's
    step is tried as the gap from its least value to the next, snapped to fp16 (the file's step,
    where it stored one so: Q4_1), its largest magnitude over 16 or 127 (Q5_0's and Q8_0's
    symmetric grids), that gap as it is (Q4_K), its span over 15, and its smallest gap between
    any two values, each gap also halved and thirded (levels left unused), coarse before fine:
    the first that fits a block is its step. A block on
    no such grid takes (max - min) / (levels - 1) and rounds. Each candidate is checked only on
    the blocks still without a grid, the smallest gaps (a sort) only once most blocks have one,
    and none when they fit under half of a sample of the blocks (a tensor on no such grid)."""
    N, K = w.shape
    b = w.detach().float().reshape(-1, GROUP)                            # (B, G)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    x = b - lo
    first = x.masked_fill(x <= 0, float("inf")).amin(-1, keepdim=True)  # inf: every value equal
    top, span = torch.maximum(hi, -lo), hi - lo
    s = torch.where(torch.isinf(first), torch.ones_like(first), span / (levels - 1))
    todo = torch.isfinite(first)[:, 0]                                   # (B,) blocks without a grid yet
    gaps = torch.full_like(first, float("nan"))  # each block's smallest gap, sorted out when first asked

    def min_gap(at):
        idx = torch.arange(len(x))[at] if isinstance(at, slice) else at
        need = idx[torch.isnan(gaps[idx, 0])]
        if len(need):
            gaps[need] = _min_gap(x[need])
        return gaps[at]

    cheap = (lambda at: first[at].half().float(), lambda at: top[at] / 16, lambda at: top[at] / 127,
             lambda at: first[at], lambda at: first[at] / 2, lambda at: first[at] / 3, lambda at: span[at] / 15)
    by_sort = (min_gap, lambda at: min_gap(at) / 2, lambda at: min_gap(at) / 3)
    sample = torch.arange(0, len(x), max(1, len(x) // 512))             # 512 blocks or more
    hit = torch.zeros(len(sample), 1, dtype=torch.bool)
    for step in cheap:
        hit |= _on_grid(x[sample], step(sample), span[sample], top[sample], levels)
    # a tensor on no such grid (Q6_K's sub-blocks of 16) is not scanned
    steps = cheap + by_sort if hit.float().mean() >= 0.5 else ()
    for step in steps:
        left = int(todo.sum())
        if not left or (step in by_sort and left > len(todo) // 2):
            break  # most blocks on no grid so far: not sorted as well
        # while most blocks are left (the first candidate fits nearly all), run on all: no copies
        at = slice(None) if left > len(todo) // 2 else todo.nonzero()[:, 0]
        cand = step(at)
        fit = _on_grid(x[at], cand, span[at], top[at], levels)
        if isinstance(at, slice):
            fit &= todo[:, None]
            s = torch.where(fit, cand, s)
            todo &= ~fit[:, 0]
        else:
            s[at[fit[:, 0]]] = cand[fit[:, 0]]
            todo[at[fit[:, 0]]] = False
    u = (x / s).round().clamp(0, levels - 1)
    # the coarsest grid through these levels, so a block whose step came out a fraction of the
    # file's (a finer candidate fit first) is stored as the file's, and snapped to fp16 again
    q = u.to(torch.int32)
    cols = q.t().contiguous()                                            # (G, B)
    g = cols[0]
    for j in range(1, GROUP):
        g = torch.gcd(g, cols[j])
    g = g.clamp(min=1)[:, None]
    if bool((g > 1).any()):
        s, u = s * g, torch.div(q, g, rounding_mode="floor").float()
        s16 = s.half().float()
        s = torch.where((s16 - s).abs() <= s * 2.0 ** -20, s16, s)
    G = K // GROUP
    return lo.view(N, G, 1), s.view(N, G, 1), u.view(N, G, GROUP), 1 - todo.float().mean().item()


def _pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) levels 0..15 -> the int4 kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def _int4mm(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scale_zero)


def _scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(N, K/G) each -> (K/G, N, 2) bf16, the kernel's layout."""
    return torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()


@dataclass
class Int4:
    packed: torch.Tensor       # the kernel's packed layout of (N, K) 4-bit values
    scale_zero: torch.Tensor   # (K / GROUP, N, 2) bf16
    exact: float               # the share of blocks that reproduce w (Q4_1, Q4_K), bar bf16 scales

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int4":
        assert fits(w.shape), tuple(w.shape)
        N, K = w.shape
        lo, s, u, exact = grid(w, 16)
        return cls(_pack(u.view(N, K)), _scale_zero(s[..., 0], (lo + 8 * s)[..., 0]), exact)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16."""
        return _int4mm(x, self.packed, self.scale_zero)


@dataclass
class Int8:
    """8-bit levels in blocks of 32, each split as u = 16 h + l into two int4 weights stacked
    along the output axis ((2N, K): h's rows, then l's), multiplied in one call and summed."""
    packed: torch.Tensor       # the kernel's packed layout of (2N, K) 4-bit values
    scale_zero: torch.Tensor   # (K / GROUP, 2N, 2) bf16
    exact: float               # the share of blocks that reproduce w (Q4_*, Q5_0, Q8_0), bar bf16 scales

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8":
        assert fits(w.shape), tuple(w.shape)
        N, K = w.shape
        lo, s, u, exact = grid(w, 256)
        u = u.to(torch.uint8)
        h, l = u >> 4, u & 15
        # h's half stores h + c with no zero, and l's zero carries the rest (lo, rounded to bf16);
        # c = 8 unless the block's h needs the room, so a block of 128 levels or fewer has h's
        # half free of any offset, and the two outputs do not cancel each other's rounding
        c = torch.clamp(15 - h.amax(-1, keepdim=True), max=8)             # (N, K/G, 1) uint8
        z = lo + 8 * s - 16 * s * (c.float() - 8)
        q = torch.cat([(h + c).view(N, K), l.view(N, K)])                # (2N, K) uint8
        s, z = s[..., 0], z[..., 0]                                       # (N, K/G)
        sz = torch.cat([_scale_zero(16 * s, torch.zeros_like(s)), _scale_zero(s, z)], 1)   # (K/G, 2N, 2)
        return cls(_pack(q), sz, exact)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) fp32: the halves' sum is not rounded to bf16 again."""
        y = _int4mm(x, self.packed, self.scale_zero)                     # (M, 2N)
        h, l = y.chunk(2, dim=-1)
        return h.float().add_(l)


@dataclass
class Int8Channels:
    """int8 with one scale per output channel: the format of a weight whose shape int4/int8
    blocks do not fit (proj.py's "channels")."""
    q: torch.Tensor       # (N, K) int8
    scale: torch.Tensor   # (N,) bf16, per output channel

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8Channels":
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(torch.bfloat16))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16."""
        return torch._weight_int8pack_mm(x, self.q, self.scale)
