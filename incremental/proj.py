"""A fused projection: linear layers that read one input, kept in every weight format a pass
has asked for (precision.py switches between them per pass)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import Bf16, Bf16Gated, Int4, Int8, Int8Channels, fits


class Proj:
    """Linear layers that read one input, fused along the output axis, in every weight format a
    pass has asked for. The HF modules' weights become views of the fused one, so nothing is held
    twice and HF's own forward still runs (while the weights as loaded are not released)."""

    def __init__(self, linears: list[nn.Linear], gated: bool = False):
        self.linears, self.sizes = linears, [lin.out_features for lin in linears]
        # a gated MLP's gate and up (in that order): bf16 keeps them apart for swiglu()
        self.gated = gated and len(linears) == 2 and self.sizes[0] == self.sizes[1]
        self.refill(linears)
        self.shape, self.dtype = tuple(self.weight.shape), self.weight.dtype      # (N, K)
        biases = [lin.bias for lin in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else self.weight.new_zeros(n) for b, n in zip(biases, self.sizes)])
        self._formats: dict[str, object] = {}

    def refill(self, linears: list[nn.Linear]) -> None:
        """The weight as loaded, from these layers (this Proj's own, or the same ones of a fresh
        copy of the model); this Proj's HF layers get views of it."""
        self.weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
        for lin, part in zip(self.linears, self.weight.split(self.sizes)):
            lin.weight.data = part

    def release(self) -> None:
        """Drop the weight as loaded; the formats made from it stay. refill brings it back."""
        self.weight = None
        for lin in self.linears:
            lin.weight.data = lin.weight.data.new_empty(0)

    def format(self, mode: str):
        """The weight in `mode` (bf16, int8 or int4 in blocks, channels: int8 per channel, or
        rank: the ranking head's, int4 blocks), made on first use. Blocks need N % 16 and K % 32;
        a weight that does not fit them runs channels."""
        if mode in ("int8", "int4", "rank") and not fits(self.shape):
            mode = "channels"
        if mode not in self._formats:
            assert self.weight is not None, f"{mode} weights made after the weights as loaded were released"
            make = {"bf16": Bf16Gated.of if self.gated else Bf16.of, "int8": Int8.of, "int4": Int4.of, "rank": Int4.of,
                    "channels": Int8Channels.of}
            self._formats[mode] = make[mode](self.weight)
        return self._formats[mode]

    def drop(self, mode: str) -> None:
        """Forget the weight in `mode` (made to test it, and not used)."""
        self._formats.pop(mode, None)

    def adopt(self, mode: str, fmt) -> None:
        """Take the weight in `mode` as made by an earlier load (format_store.py)."""
        self._formats[mode] = fmt

    def formats(self, modes: tuple[str, ...]) -> dict:
        """The weights made so far in these modes."""
        return {m: f for m, f in self._formats.items() if m in modes}

    def exact(self, mode: str) -> float:
        """The share of this projection's blocks in `mode` (int8 or int4) that reproduce its weights."""
        return self.format(mode).exact if fits(self.shape) else 0.0

    def __call__(self, x: torch.Tensor, mode: str, keep: bool = False):
        """x (..., K) -> (..., N), split into the fused layers' outputs, in the stream's dtype (the
        weights' as loaded); with keep, in the matmul's (bf16) for a caller whose next op promotes
        it anyway (a residual add): the same values, one pass over them fewer."""
        if mode == "fp32":
            y = F.linear(x, self.weight, self.bias)
        else:
            shape, w = x.shape, self.format(mode)
            xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            y = w.mm(xb).reshape(*shape[:-1], -1)
            if not keep:
                y = y.to(self.dtype)  # the stream's, as loaded (fp32 on a CPU)
            if self.bias is not None:
                y = y + self.bias
        return y.split_with_sizes(self.sizes, -1) if len(self.sizes) > 1 else y

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """A gated Proj at bf16 without bias: x (..., K) -> silu(gate) * up (..., I) bf16 (quant.Bf16Gated)."""
        assert self.gated and self.bias is None, "swiglu is a bias-free gate and up's"
        shape = x.shape
        h = self.format("bf16").swiglu(x.reshape(-1, shape[-1]).to(torch.bfloat16))
        return h.reshape(*shape[:-1], -1)


@dataclass
class LayerProj:
    qkv: Proj
    o: Proj
    gate_up: Proj
    down: Proj

    def all(self) -> list[Proj]:
        return [self.qkv, self.o, self.gate_up, self.down]


def layer_projs(layer) -> LayerProj:
    """A decoder layer's projections, fused."""
    qkv, o, gate_up, down = layer_linears(layer)
    return LayerProj(Proj(qkv), Proj(o), Proj(gate_up, gated=True), Proj(down))


def layer_linears(layer) -> list[list[nn.Linear]]:
    """A decoder layer's linear layers, grouped as LayerProj fuses them."""
    a, m = layer.self_attn, layer.mlp
    return [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
