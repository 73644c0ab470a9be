"""Weight formats for the CPU's matrix multiplies: bf16, int8 per output channel, int4 in groups
of 32 along the input axis.

A GGUF model arrives already quantized: llama.cpp's Q4_1 stores each block of 32 weights of a
row as q * d + m (q in 0..15, d and m fp16), and the GGUF loader hands livekv those values
dequantized to fp32. int4 here uses the same blocks, so for a Q4_1 tensor it recovers q, d and m
and the int4 weight *is* the file's weight; for any other tensor it quantizes each block by its
min and max, which loses accuracy, so `Int4.exact` says which happened and precision.resolve
only picks int4 by itself when every projection is exact.

torch's int4 kernel dequantizes w = (q - 8) * scale + zero, with bf16 scales, inputs and outputs
(so d and m round to bf16). Carrying the scales and the inputs in two bf16 parts each (hi + lo)
made each projection nearer fp32 but whole greedy lines no more often equal to fp32's, and a
decode step slower: so one call, as llama.cpp, which rounds its activations too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # GGUF's block size, and the int4 kernel's group size here


@dataclass
class Int8:
    q: torch.Tensor       # (N, K) int8
    scale: torch.Tensor   # (N,) bf16, per output channel

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8":
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(torch.bfloat16))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16."""
        return torch._weight_int8pack_mm(x, self.q, self.scale)


@dataclass
class Int4:
    packed: torch.Tensor       # the kernel's packed layout of (N, K) 4-bit values
    scale_zero: torch.Tensor   # (K / GROUP, N, 2) bf16
    exact: bool                # the blocks reproduce w to fp32 (a Q4_1 tensor), bar bf16 scales

    @staticmethod
    def fits(shape) -> bool:
        """Whether an (N, K) weight has the kernel's tiling: N % 16 and K % GROUP."""
        N, K = shape
        return N % 16 == 0 and K % GROUP == 0

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int4":
        assert cls.fits(w.shape), tuple(w.shape)
        N, K = w.shape
        blocks = w.detach().float().view(N, K // GROUP, GROUP)             # (N, K/G, G)
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        # Q4_1 stored d in fp16, so rounding the step to fp16 recovers it exactly
        d = ((hi - lo) / 15).half().float()
        q = torch.where(d > 0, (blocks - lo) / torch.where(d > 0, d, 1), 0).round().clamp(0, 15)
        exact = bool(torch.equal(q * d + lo, blocks))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(N, K).to(torch.int32), 1)
        scale = d.view(N, K // GROUP).t()                                  # (K/G, N)
        zero = (lo + 8 * d).view(N, K // GROUP).t()
        return cls(packed, torch.stack([scale, zero], -1).to(torch.bfloat16).contiguous(), exact)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)
