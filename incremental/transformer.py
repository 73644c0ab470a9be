"""A forward pass over a Hugging Face Llama-family model that reads and writes livekv's KV cache.

HF's own forward owns its cache and its masks; livekv needs queries at arbitrary slots with
arbitrary position ids and an arbitrary visibility mask (a cached suffix hidden from a completion,
whole position groups): a Layout (layout.py). So this runs the HF modules layer by layer,
gpt-fast style, and the result is checked against HF's forward when a model is loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import LAZY_MAX_QUERIES, PendingDeltas, attend, attention_with_deltas
from .layout import Layout
from .precision import Precision


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# the RMSNorms whose forward is exactly F.rms_norm's math (one fused op instead of eight)
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    if type(norm).__name__ in PLAIN_RMS_NORMS:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


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
        self.hf, self.embed, self.layers, self.norm, self.rotary = hf, m.embed_tokens, m.layers, m.norm, m.rotary_emb
        cfg = hf.config
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.qk_norm = hasattr(attn0, "q_norm")
        self.inv_freq = self.rotary.inv_freq.detach().float().clone()  # (D/2,) for re-rotation
        self.vocab_size = cfg.vocab_size
        p = next(hf.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def forward(self, kv, ids: torch.Tensor, pos: torch.Tensor, slots, layout: Layout,
                logits_at: torch.Tensor | None = None, probe: int | None = None, precision: str = "fp32",
                argmax: bool = False):
        """Run tokens `ids` at positions `pos`, writing their K/V into `slots` of `kv`.

        ids, pos: (n,). slots: an int (the n tokens go to slots [slots, slots + n)) or a (n,) index
        tensor. Each query attends to kv slots [0, layout.n_keys) where layout.mask (n, n_keys) is
        True (all when None); the new tokens must lie inside that range, with no delta pending.
        Returns logits (len(logits_at), V) for the selected query rows, or None. With `probe`,
        nothing is written: cached tokens are run again through the layers before `probe` and
        their fresh (K, V) at layer `probe`, each (1, Hkv, n, D), are returned (blend.py). With
        `argmax`, the selected rows' greedy tokens (len(logits_at),) instead of their logits.
        precision: of the linear layers (precision.py); the rest runs in the cache's dtype."""
        n, n_keys, mask = ids.shape[0], layout.n_keys, layout.mask
        self.precision.set(precision, n)
        x = self.embed(ids.to(self.device)[None])                      # (1, n, C)
        cos, sin = self.rotary(x, pos.to(self.device)[None])           # (1, n, D)
        cos, sin = cos[:, None], sin[:, None]                          # (1, 1, n, D)
        attn_mask = None
        if mask is not None:
            attn_mask = torch.zeros(mask.shape, dtype=x.dtype, device=self.device)
            attn_mask.masked_fill_(~mask.to(self.device), float("-inf"))  # (n, n_keys)
        contiguous = isinstance(slots, int)
        pending = PendingDeltas(layout, n >= LAZY_MAX_QUERIES, self.inv_freq.to(self.device))
        if pending.runs is not None and attn_mask is not None:
            attn_mask = attn_mask[:, pending.cols]                     # the runs' columns only
        tables = {}

        def rope(q, d):  # q rotated to its positions minus d
            if d not in tables:
                c, s = self.rotary(x, (pos - d).to(self.device)[None])
                tables[d] = c[:, None], s[:, None]
            c, s = tables[d]
            return q * c + _rotate_half(q) * s

        if not contiguous:
            slots = slots.to(self.device)
        mode = self.precision.mode
        for i, layer in enumerate(self.layers):
            a, proj = layer.self_attn, self.precision.layers[i]
            q, k, v = proj.qkv(_norm(layer.input_layernorm, x), mode)
            q = q.view(1, n, -1, self.head_dim)                        # (1, n, H, D)
            k = k.view(1, n, -1, self.head_dim)                        # (1, n, Hkv, D)
            v = v.view(1, n, -1, self.head_dim)
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, H|Hkv, n, D)
            k = k * cos + _rotate_half(k) * sin
            if i == probe:
                return k, v
            if probe is not None:
                pass  # a probe attends to the cache as it is
            elif contiguous:
                kv.k[i, :, slots: slots + n] = k[0]
                kv.v[i, :, slots: slots + n] = v[0]
            else:
                kv.k[i].index_copy_(1, slots, k[0])
                kv.v[i].index_copy_(1, slots, v[0])
            K, V = kv.layer(i, n_keys)                                 # (1, Hkv, n_keys, D)
            if pending.runs is None or pending.copy:
                K, V = pending.rotated(K, V)
                q = q * cos + _rotate_half(q) * sin
                o = attend(q, K, V, attn_mask, self.scaling, bf16=mode == "bf16" and self.device.type == "cpu")
            else:
                o = attention_with_deltas(q, K, V, rope, pending.runs, attn_mask, self.scaling)
            x = x + proj.o(o.transpose(1, 2).reshape(1, n, -1), mode)
            gate, up = proj.gate_up(_norm(layer.post_attention_layernorm, x), mode)
            x = x + proj.down(layer.mlp.act_fn(gate) * up, mode)
        if logits_at is None:
            return None
        h = _norm(self.norm, x[0, logits_at.to(self.device)])          # (m, C)
        if argmax:
            return self.precision.argmax(h).cpu()                      # (m,)
        return self.precision.logits(h).float()                        # (m, V)

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
        return err
