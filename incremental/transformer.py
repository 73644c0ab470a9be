"""A forward pass over a Hugging Face Llama-family model that reads and writes livekv's KV cache.

HF's own forward owns its cache and its masks; livekv needs queries at arbitrary slots with
arbitrary position ids and an arbitrary visibility mask (a cached suffix hidden from a completion,
whole position groups): a Layout (layout.py). So this runs the HF modules layer by layer,
gpt-fast style, and the result is checked against HF's forward when a model is loaded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .attention import merge
from .batch import Pass
from .hydragen import shared_attention
from .layout import Layout
from .pass_attention import PassAttention, Rope
from .precision import Precision
from .quant import native_bf16


# the RMSNorms whose forward is exactly F.rms_norm's math (one fused op instead of eight)
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def _norm(norm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm module as a function: F.rms_norm over its weight where that is its math (looked up
    once: a decode step runs sixty norms of one row, where module lookups cost as much)."""
    if type(norm).__name__ in PLAIN_RMS_NORMS:
        w, eps = norm.weight, norm.variance_epsilon
        return lambda x: F.rms_norm(x, w.shape, w, eps)
    return norm


def _silu(act_fn) -> bool:
    return type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def _act(act_fn) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation, in place where it is SiLU (its input is the gate's part of a fresh output)."""
    if _silu(act_fn):
        return lambda g: F.silu(g, inplace=True)
    return act_fn


class Transformer:
    """The HF model's modules, driven over an external KVCache."""

    def __init__(self, hf):
        m = hf.model
        need = ("embed_tokens", "layers", "norm", "rotary_emb")
        missing = [n for n in need if not hasattr(m, n)]
        attn0 = m.layers[0].self_attn if hasattr(m, "layers") else None
        if missing or attn0 is None or not all(hasattr(attn0, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"model type {hf.config.model_type!r} does not have the Llama layout livekv runs "
                             f"(missing {missing or 'q/k/v/o projections'}); use a Llama, Qwen2 or Mistral family model")
        if not all(hasattr(layer.mlp, p) for layer in m.layers for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise ValueError(f"model type {hf.config.model_type!r} does not have a gated MLP (gate/up/down "
                             "projections); use a Llama, Qwen2 or Mistral family model")
        self.precision = Precision(hf)  # fuses the projections: fp32 until a pass asks for more
        self.hf, self.embed, self.layers, self.rotary = hf, m.embed_tokens, m.layers, m.rotary_emb
        self.norm = _norm(m.norm)
        # each layer's (input norm, post-attention norm, activation) as functions
        self.fns = [(_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm), _act(layer.mlp.act_fn))
                    for layer in self.layers]
        # at bf16, silu(gate) * up in oneDNN's epilogues (quant.Bf16Gated), where the MLP is that
        self.swiglu = native_bf16(self.precision.device) and all(
            _silu(layer.mlp.act_fn) and lp.gate_up.gated and lp.gate_up.bias is None
            for layer, lp in zip(self.layers, self.precision.layers))
        cfg = hf.config
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.qk_norm = hasattr(attn0, "q_norm")
        self.inv_freq = self.rotary.inv_freq.detach().float().clone()  # (D/2,) for re-rotation
        self.vocab_size = cfg.vocab_size
        self.kv_peak = 0.0  # the largest |K| or |V| check_against_hf saw
        p = next(hf.parameters())
        self.device, self.dtype = p.device, p.dtype

    def forward(self, kv, ids: torch.Tensor, pos: torch.Tensor, slots, layout: Layout,
                logits_at: torch.Tensor | None = None, probe: int | None = None, precision: str = "fp32",
                argmax: bool = False, shared: tuple = ()):
        """Run tokens `ids` at positions `pos`, writing their K/V into `slots` of `kv`: one Pass
        (batch.py says what each argument means and what comes back) run alone. With `probe`,
        nothing is written: cached tokens are run again through the layers before `probe` and
        their fresh (K, V) at layer `probe`, each (1, Hkv, n, D), are returned (blend.py)."""
        return self.run([Pass(kv, ids, pos, slots, layout, logits_at, argmax, precision, shared)], probe)[0]

    @torch.inference_mode()
    def run(self, passes: list[Pass], probe: int | None = None) -> list:
        """One forward over several passes: their rows go through the norms, projections, MLP
        and output head together, so the weights are read once for all of them; RoPE, K/V
        writes and attention are per pass, each against its own cache and layout (ragged: no
        padding). The passes must share one precision; the weights it uses are chosen for all
        of their rows (Precision.set). Returns each
        pass's result. A pass alone is a batch of one: there is one path."""
        sizes = [p.n for p in passes]
        n = sum(sizes)
        self.precision.set(passes[0].precision, n, batched=len(passes) > 1)
        one = len(passes) == 1
        ids = passes[0].ids if one else torch.cat([p.ids for p in passes])
        pos = (passes[0].pos if one else torch.cat([p.pos for p in passes])).to(self.device)
        x = self.embed(ids.to(self.device)[None])                      # (1, n, C)
        cos, sin = self.rotary(x, pos[None])                           # (1, n, D)
        rope = Rope(cos[:, None], sin[:, None])                        # every row at its position
        rows = [PassAttention(self, p, x) for p in passes]
        mode = self.precision.mode
        for i, layer in enumerate(self.layers):
            proj, (norm_in, norm_post, act) = self.precision.layers[i], self.fns[i]
            q, k, v = proj.qkv(norm_in(x), mode)
            q = q.view(1, n, -1, self.head_dim)                        # (1, n, H, D)
            k = k.view(1, n, -1, self.head_dim)                        # (1, n, Hkv, D)
            v = v.view(1, n, -1, self.head_dim)
            if self.qk_norm:
                q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, H|Hkv, n, D)
            k, qr = rope(k), rope(q)
            if probe is not None and i == probe:
                return [(k, v)]  # a probe's one pass
            parts = [(rows[0], q, qr, k, v)] if one else zip(rows, *(t.split(sizes, 2) for t in (q, qr, k, v)))
            own = [r.attend(i, *t, write=probe is None) for r, *t in parts]  # (out, lse)
            o = own[0][0] if one else torch.cat([a for a, _ in own], 2)  # (1, H, n, D), bf16 from a bf16 encode
            shared = shared_attention(i, rows, self.scaling)   # context groups in another cache
            if shared:  # a pass without groups apart weighs its own part 1 (lse 0) against none
                lse = torch.cat([b if b is not None else a.new_zeros(a.shape[:3]) for a, b in own], 2)
                o = merge([(o.to(x.dtype), lse), *shared])[0]
            # at bf16 the projections' outputs stay bf16 until an op promotes them (the same values)
            x = x + proj.o(o.transpose(1, 2).reshape(1, n, -1), mode, keep=True)
            if mode == "bf16" and self.swiglu:
                h = proj.gate_up.swiglu(norm_post(x))                   # (1, n, I) bf16
            else:
                gate, up = proj.gate_up(norm_post(x), mode)            # views of one fresh output
                h = act(gate).mul_(up)
            x = x + proj.down(h, mode, keep=True)
        return self._heads(passes, x)

    def _heads(self, passes: list[Pass], x: torch.Tensor) -> list:
        """Each pass's selected rows through the output head: the greedy ones in one call, the
        ones that want logits in another."""
        at, picked = 0, {True: [], False: []}
        for j, p in enumerate(passes):
            if p.logits_at is not None:
                picked[p.argmax].append((j, at + p.logits_at.to(self.device)))
            at += p.n
        allow = None
        if any(passes[j].allow is not None for j, _ in picked[True]):
            allow = torch.cat([passes[j].allow.to(self.device) if passes[j].allow is not None else
                               torch.ones(len(r), self.vocab_size, dtype=torch.bool, device=self.device)
                               for j, r in picked[True]])                 # (m, V)
        out = [None] * len(passes)
        for greedy, chosen in picked.items():
            if not chosen:
                continue
            h = self.norm(x[0, torch.cat([r for _, r in chosen])])       # (m, C)
            res = self.precision.argmax(h, allow).cpu() if greedy else self.precision.logits(h).float()
            for (j, r), part in zip(chosen, res.split([len(r) for _, r in chosen])):
                out[j] = part                                          # (m,) tokens or (m, V) logits
        return out

    @torch.inference_mode()
    def check_against_hf(self, kv_factory, tokens: list[int]) -> float:
        """Max |logit difference| between this forward and HF's on `tokens`; refuse a mismatch."""
        ids = torch.tensor(tokens, dtype=torch.long)
        self.precision.set("fp32", len(tokens))
        ref = self.hf(ids[None].to(self.device)).logits[0].float()
        kv = kv_factory(len(tokens))
        n = len(tokens)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        ours = self.forward(kv, ids, torch.arange(n), 0, Layout(kv, mask), torch.arange(n))
        err = (ours - ref).abs().max().item()
        tol = 1e-2 if self.dtype == torch.float32 else 0.25 * ref.abs().max().item()
        if not err <= tol:
            raise ValueError(f"model type {self.hf.config.model_type!r}: livekv's forward disagrees with HF's "
                             f"(max logit difference {err:.3g} > {tol:.3g}); this architecture is not supported")
        # decode steps read an fp16 copy of the cache (pass_attention.py): only for K/V well
        # inside fp16's range (65,504) on these tokens
        self.kv_peak = max(kv.k[:, :, :n].abs().max().item(), kv.v[:, :, :n].abs().max().item())
        return err
