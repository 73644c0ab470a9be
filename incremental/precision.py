"""How the model's matrix multiplies run: as loaded (fp32), in bf16 when encoding, with int8
weights when decoding.

Every other op stays in the model's dtype (fp32 on a CPU): the residual stream, norms, RoPE,
attention and the KV cache, so rotating cached keys stays exact and nothing drifts over edits (a
bf16 cache would round each rotation again). Only the linear layers' inputs are cast, and their
outputs come back in the stream's dtype.

    fp32   the weights as loaded (fp32 on a CPU, --dtype on CUDA)
    bf16   bf16 weights and inputs for passes of 16 tokens or more (encoding, a pasted line):
           AMX / AVX512-BF16 run those 3-9x faster than fp32; smaller passes (decode steps)
           stay as loaded, where bf16 would save little and cost agreement
    int8   bf16 as above, and below 16 tokens int8 weights with per-channel scales (the output
           head in bf16): a decode step reads about a third of fp32's bytes, at some agreement
    auto   bf16 on a CPU that runs bf16 matmuls natively, as loaded elsewhere: decided by the
           machine alone, so the same every time (the README says what was measured)

Each forward pass names its precision (a document's Config.precision): the weights are kept in
every format asked for so far, so documents (and benchmark labels) can differ in one engine.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PRECISIONS

SMALL = 16  # queries in a pass below which int8 weights are used (decode steps, a short tail)


def resolve(precision: str, device: torch.device) -> str:
    """The precision `auto` stands for on this machine (others stand for themselves)."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


class Linear(nn.Module):
    """A linear layer with its weight in every format asked for; `mode` says which runs."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.mode = "fp32"
        self._bf16: torch.Tensor | None = None
        self._int8: tuple[torch.Tensor, torch.Tensor] | None = None

    def bf16(self) -> torch.Tensor:
        if self._bf16 is None:
            self._bf16 = self.weight.detach().to(torch.bfloat16)
        return self._bf16

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._int8 is None:
            w = self.weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)             # (N,) per output channel
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K)
            self._int8 = q, scale.to(torch.bfloat16)
        return self._int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp32":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.mode == "int8":
            q, scale = self.int8()
            y = torch._weight_int8pack_mm(xb, q, scale)
        else:
            y = F.linear(xb, self.bf16())
        y = y.to(x.dtype).reshape(*shape[:-1], -1)  # back to the stream's dtype (fp32 on a CPU)
        return y if self.bias is None else y + self.bias


class Precision:
    """The model's linear layers, wrapped once, switched per forward pass."""

    def __init__(self, hf):
        self.linears: list[Linear] = []
        for layer in hf.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, self._wrap(child))
        self.lm_head = self._wrap(hf.lm_head)
        self.device = hf.lm_head.weight.device

    def _wrap(self, lin: nn.Linear) -> Linear:
        w = Linear(lin)
        self.linears.append(w)
        return w

    def set(self, precision: str, n_queries: int) -> None:
        """Run the next pass of n_queries at this precision."""
        p = resolve(precision, self.device)
        assert p in PRECISIONS[1:], p
        if p == "fp32" or n_queries >= SMALL:
            mode = p if p == "fp32" else "bf16"
        else:
            mode = "fp32" if p == "bf16" else "int8"
        for w in self.linears:
            w.mode = mode
        if mode == "int8":
            self.lm_head.mode = "bf16"  # its rounding flips close greedy choices most
