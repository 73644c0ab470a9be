"""How the model's matrix multiplies run: as loaded (fp32), in bf16 when encoding, with int8 or
int4 weights when decoding.

Every other op stays in the model's dtype (fp32 on a CPU): the residual stream, norms, RoPE,
attention and the KV cache, so rotating cached keys stays exact and nothing drifts over edits (a
bf16 cache would round each rotation again). Only the linear layers' inputs are cast, and their
outputs come back in the stream's dtype.

    fp32   the weights as loaded (fp32 on a CPU, --dtype on CUDA)
    bf16   bf16 weights and inputs for passes of 16 tokens or more (encoding, a pasted line):
           AMX / AVX512-BF16 run those several times faster than fp32; smaller passes (decode
           steps) stay as loaded
    int8   bf16 as above, and below 16 tokens int8 weights in blocks of 32 (quant.py): for a
           GGUF at 5 to 8 bits (Q5_0, Q8_0) these are the file's own weights, read at a
           quarter of fp32's bytes; other weights round to 256 levels a block
    int4   bf16 as above, and below 16 tokens int4 weights in GGUF's blocks of 32: for a Q4_1
           model these are the file's own weights, read at an eighth of fp32's bytes
    auto   on a CPU with native bf16 matmuls: the block format that reproduces the model's
           weights (Precision.blocks: int4 for a Q4_1 GGUF, int8 for one at 5 to 8 bits), else
           bf16; fp32 elsewhere. Decided by the machine and the model alone, so the same every
           time (the README says what was measured)

q, k and v (and gate and up) read the same input, so each such set is one fused projection: one
matmul, one cast of its input. Each forward pass names its precision (a document's
Config.precision): the weights are kept in every format asked for so far, so documents (and
benchmark labels) can differ in one engine. An engine loaded at int8 or int4 (auto on this
machine for a Q4_1 model) releases the projections' weights as loaded once its own formats are
made, since none of its passes reads them; a pass that does (a document set to fp32 or bf16)
loads the model again first.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from .config import PRECISIONS
from .proj import Proj, layer_linears, layer_projs
from .quant import fused_bf16_attention, native_bf16

log = logging.getLogger("livekv")

SMALL = 16  # queries in a pass below which int8/int4 weights are used (decode steps, a short tail)
# Rows of a batch of several passes from which bf16 weights replace int8/int4: bf16's AMX matmul
# costs about the same for 1-12 rows, the int kernels grow with the rows (README, "Many editors").
BATCH_BF16 = 6
# int8 blocks run the int4 kernel on twice the rows (quant.Int8): from this many query rows, a pass
# alone or a batch, bf16 weights are as fast (`livekv bench precision --rows`, README "Precision")
INT8_ROWS = 3
# Share of the projections' weights that int8 blocks must reproduce for `auto` to pick int8 (a GGUF
# at 5-8 bits; Qwen2.5-Coder's Q6_K down projections are the rest): int8 blocks then decode faster
# than fp32 weights with greedy lines as fp32's (README, "Precision")
EXACT_SHARE = 0.5
RESCORE = 64  # the ranking head's best tokens that argmax scores again with the head as loaded
# Rows from which the ranking head reads bf16 weights: torch's int kernels grow with the rows, bf16's
# AMX matmul hardly does (README, "Many editors")
HEAD_BF16_ROWS = 4


def resolve(precision: str, device: torch.device, blocks: str | None = None) -> str:
    """The precision `auto` stands for on this machine, for a model whose weights the block
    format `blocks` (int4, int8 or None: Precision.blocks) reproduces (others stand for
    themselves)."""
    if precision != "auto":
        return precision
    if native_bf16(device):
        return blocks or "bf16"
    return "fp32"


def _reproduced(projs: list[Proj], mode: str, share: float) -> bool:
    """Whether the blocks in `mode` reproduce at least `share` of these projections' weights
    (stops at the first projection that decides it)."""
    sizes = [p.shape[0] * p.shape[1] for p in projs]
    allowed, missed = (1 - share) * sum(sizes), 0
    for p, n in zip(projs, sizes):
        missed += (1 - p.exact(mode)) * n
        if missed > allowed:
            return False
    return True


# the weight formats each precision's passes read (set): its encodes, then its decode steps
PASS_MODES = {"fp32": ("fp32",), "bf16": ("bf16", "fp32"), "int8": ("bf16", "int8"), "int4": ("bf16", "int4")}


class Precision:
    """The model's projections, fused once, switched per forward pass."""

    def __init__(self, hf):
        self.layers = [layer_projs(layer) for layer in hf.model.layers]
        self.lm_head = Proj([hf.lm_head])
        self.device = hf.lm_head.weight.device
        self.mode = "fp32"
        self.bf16_attention = fused_bf16_attention(self.device)  # a bf16 encode's attention in bf16 too
        self._blocks: str | None = None  # blocks()'s answer, once known ("none" for None)
        self.reload: Callable[[], nn.Module] | None = None  # a fresh copy of the model as loaded (Engine's)
        self.kept: tuple[str, ...] | None = None  # the formats left while the weights as loaded are released

    def _projs(self) -> list[Proj]:
        return [p for lp in self.layers for p in lp.all()]

    def _with_head(self) -> list[Proj]:
        """The projections, the output head last: the order weights() and stored() index."""
        return self._projs() + [self.lm_head]

    def weights(self) -> list[torch.Tensor]:
        """Every projection's weight as loaded, the output head's last: what the formats are made of."""
        return [p.weight for p in self._with_head()]

    def stored(self, modes: tuple[str, ...]) -> dict:
        """blocks()'s answer and the formats made so far in these modes, by the projection's
        index in weights() (format_store.py keeps them between loads)."""
        made: dict[str, dict[int, object]] = {}
        for i, p in enumerate(self._with_head()):
            for m, f in p.formats(modes).items():
                made.setdefault(m, {})[i] = f
        return {"blocks": self._blocks, "formats": made}

    def adopt(self, data: dict | None) -> None:
        """Take what stored() gave on an earlier load of the same weights, before anything is made."""
        if not data:
            return
        projs = self._with_head()
        for m, fs in data["formats"].items():
            for i, f in fs.items():
                projs[i].adopt(m, f)
        self._blocks = data["blocks"] if self._blocks is None else self._blocks

    def release(self, precision: str) -> bool:
        """Drop the projections' weights as loaded where this precision's passes never read them
        (int8 and int4: encodes read bf16 copies, decode steps int8/int4 blocks) and `reload` can
        bring them back. The output head stays: the embedding shares it, and greedy choices
        are scored again with it. Returns whether they were released."""
        p = self.resolve(precision)
        if self.kept is not None or self.reload is None or "fp32" in PASS_MODES[p]:
            return False
        self.prepare(p)
        for proj in self._projs():
            proj.release()
        self.kept = PASS_MODES[p]
        return True

    def _restore(self) -> None:
        log.warning("a pass reads the weights as loaded, which were released (precision int8/int4 does not "
                    "read them): loading the model again")
        fresh = self.reload()
        for lp, layer in zip(self.layers, fresh.model.layers):
            for proj, lins in zip(lp.all(), layer_linears(layer)):
                proj.refill(lins)
        self.kept = None

    def blocks(self) -> str | None:
        """The block format (int4 or int8) that reproduces the model as loaded, bar bf16 scales:
        int4 when every block of every projection does (a Q4_1 GGUF), int8 when the blocks of at
        least EXACT_SHARE of the projections' weights do (a GGUF at 5 to 8 bits: Q5_0, Q8_0,
        mixed with K-quants such as Q6_K that int8 blocks only approach), else None. Formats
        made to decide and not chosen are dropped."""
        if self._blocks is None:
            self._blocks, projs = "none", self._projs()
            for mode, share in (("int4", 1.0), ("int8", EXACT_SHARE)):
                if _reproduced(projs, mode, share):
                    self._blocks = mode
                    break
                for p in projs:
                    p.drop(mode)
        return None if self._blocks == "none" else self._blocks

    def trim(self, precision: str) -> None:
        """Drop the block formats this precision's passes do not read (read from disk with the
        ones they do: a later pass that asks for them makes them again)."""
        unread = {"int8", "int4"} - set(PASS_MODES[self.resolve(precision)])
        unread |= {"channels"} if len(unread) == 2 else set()
        for p in self._projs():
            for mode in unread:
                p.drop(mode)

    def resolve(self, precision: str) -> str:
        return resolve(precision, self.device, self.blocks() if precision == "auto" and native_bf16(self.device)
                       else None)

    def prepare(self, precision: str) -> None:
        """Make the weight formats this precision's passes read now, not in a request's first pass."""
        p = self.resolve(precision)
        if self.kept is not None and not set(PASS_MODES[p]) <= set(self.kept):
            self._restore()
        for mode in PASS_MODES[p]:
            for proj in self._projs() if mode != "fp32" else ():
                proj.format(mode)
        if self.device.type == "cpu":
            self.lm_head.format("rank")  # argmax's ranking head

    def set(self, precision: str, n_queries: int, batched: bool = False) -> None:
        """Run the next pass of n_queries at this precision. batched: the queries of several
        passes (batch.py), which from BATCH_BF16 rows read bf16 weights instead of int8/int4
        (int8 blocks: from INT8_ROWS, batched or not)."""
        p = self.resolve(precision)
        assert p in PRECISIONS[1:], p
        many = n_queries >= SMALL or (batched and n_queries >= BATCH_BF16) or (p == "int8" and n_queries >= INT8_ROWS)
        if p == "fp32" or many:
            self.mode = p if p == "fp32" else "bf16"
        else:
            self.mode = "fp32" if p == "bf16" else p
        if self.kept is not None and self.mode not in self.kept:
            self._restore()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(m, C) -> (m, V): the output head as loaded, at every precision (a few rows a pass; its
        rounding is what flips close greedy choices)."""
        return self.lm_head(h, "fp32")

    def argmax(self, h: torch.Tensor, allow: torch.Tensor | None = None) -> torch.Tensor:
        """(m, C) -> (m,): the token the output head as loaded ranks first, among those `allow`
        (m, V) permits when given. On a CPU an int4 head ranks every token (an eighth of the
        bytes; bf16 from HEAD_BF16_ROWS rows), and its RESCORE best are scored again as loaded:
        the same choice unless the true first falls outside them."""
        if self.device.type != "cpu":
            logits = self.logits(h)
            return (logits if allow is None else logits.masked_fill(~allow, float("-inf"))).argmax(-1)
        rank = self.lm_head(h, "bf16" if len(h) >= HEAD_BF16_ROWS else "rank")  # (m, V)
        if allow is not None:
            rank = rank.masked_fill(~allow, float("-inf"))
        cand = rank.topk(RESCORE, dim=-1).indices                               # (m, R)
        exact = torch.einsum("mc,mrc->mr", h, self.lm_head.weight[cand])        # (m, R)
        if self.lm_head.bias is not None:
            exact += self.lm_head.bias[cand]
        if allow is not None:  # fewer than RESCORE allowed: the rest of the R are not
            exact = exact.masked_fill(~allow.gather(1, cand), float("-inf"))
        return cand.gather(1, exact.argmax(-1, keepdim=True))[:, 0]
