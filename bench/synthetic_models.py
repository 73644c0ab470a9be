"""Engines over models with random weights and a tokenizer trained on stdlib code: no model wheel,
no hub. For unit tests (a tiny Llama) and for timings, which do not depend on the weights (a
model of Qwen2.5-Coder-0.5B's shape, whose GGUF cannot go where the timing runs).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch

from livekv.incremental import Config, Engine

# Qwen2.5-Coder-0.5B's config.json, the fields that set the cost of a pass
CODER_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                   rms_norm_eps=1e-6, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def stdlib_source(module=difflib) -> str:
    return Path(module.__file__).read_text(encoding="utf-8")


def train_tokenizer(special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on stdlib code: the embedded model's kind (GPT-2 style,
    offsets included), so unit tests need no model wheel. Deterministic for the same input."""
    import argparse
    import inspect
    import typing

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=6000, special_tokens=["<|endoftext|>", *special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([stdlib_source(m) for m in (difflib, argparse, inspect, typing)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


def tiny_llama(tokenizer, seed: int = 0, layers: int = 2, **config) -> Engine:
    """A randomly initialised Llama of `layers` layers over `tokenizer`: fast, for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    return Engine(Config(**{"verify_tokens": True, "precision": "fp32", **config}), hf, tokenizer, "tiny-llama")


def coder_size(tokenizer, device: str, dtype: torch.dtype, seed: int = 0, **config) -> Engine:
    """A Qwen2 model of Qwen2.5-Coder-0.5B's shape (24 layers, hidden 896, 14 query / 2 kv heads of
    64, vocab 151,936, tied embeddings) with random weights, on `device` in `dtype`.

    The tokenizer's vocabulary is smaller than the model's: ids past it are never typed, and decode
    to nothing if the model picks one; what a pass costs is set by the model's shape alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no 2 GB host copy to move
        hf = Qwen2ForCausalLM(Qwen2Config(**CODER_SHAPE))
    hf = hf.to(dtype).eval()
    hf.requires_grad_(False)
    name = str(dtype).removeprefix("torch.")
    return Engine(Config(device=device, dtype=name, **config), hf, tokenizer, "qwen2.5-coder-0.5b-shape (random)")
