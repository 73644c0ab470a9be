"""Shared fixtures: the real embedded model (loaded once per session) and a tiny random Llama."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import torch

# Kernel tests run the Triton kernel under the interpreter when there is no GPU; it must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from livekv.incremental import Config, Engine  # noqa: E402


def stdlib_source(module=difflib) -> str:
    return Path(module.__file__).read_text(encoding="utf-8")


def excerpt(text: str, first_line: int, n_lines: int) -> str:
    return "".join(text.splitlines(keepends=True)[first_line: first_line + n_lines])


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The embedded SmolLM2-135M, checking the token mirror on every edit; fp32 weights, as the
    servers the tests start (lsp_helpers.EXACT)."""
    return Engine.load(verify_tokens=True, max_new_tokens=8, precision="fp32")


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


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """A tiny random Llama with a stdlib-trained tokenizer: no model wheel needed."""
    return tiny_llama(train_tokenizer(), max_new_tokens=8)


@pytest.fixture(scope="session")
def fim_engine() -> Engine:
    """A tiny random Llama whose tokenizer has the FIM tokens: documents open as FIM streams."""
    from livekv.incremental.fim import FIM_TOKENS
    eng = tiny_llama(train_tokenizer(FIM_TOKENS), seed=1, max_new_tokens=6)
    assert eng.fim_ids is not None
    return eng
