"""The engine's settings: one validated dataclass, a CLI flag and (some) LSP settings per field."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings, setting

# Update policies, all on the same code path (see strategies.py).
STRATEGIES = ("full", "prefix", "reuse", "conflict", "pie", "pie-window", "pie-refresh", "pie-blend", "lazy")
PRECISIONS = ("auto", "fp32", "bf16", "int8", "int4")  # precision.py runs them
BLEND_RULES = ("window", "age", "structure", "deviation", "window+age", "window+structure", "age+structure")
DTYPES = ("float32", "float16", "bfloat16")
MAX_NEW_TOKENS = 256  # one completion may not hold the model for longer than this


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "livekv"


@dataclass(frozen=True)
class Config(Settings):
    model: str | None = setting(None, "the model: none for the embedded SmolLM2-135M; qwen2.5-coder-0.5b; "
                                "a HF id, a local directory or a .gguf file", lsp=True)
    strategy: str = setting("pie", "how the cache follows edits (strategies.py)", choices=STRATEGIES, lsp=True)
    device: str | None = setting(None, "cpu, cuda or cuda:N; none: cuda when available, else cpu", lsp=True)
    dtype: str | None = setting(None, "none: bfloat16 on cuda, float32 on cpu", choices=DTYPES, lsp=True)
    threads: int = setting(0, "CPU threads for torch (0: torch's default)", min=0)
    precision: str = setting("auto", "of the matrix multiplies: fp32, bf16, int8 or int4 (int8/int4 weights when "
                             "decoding, bf16 when encoding); auto: what this machine runs fastest without losing "
                             "the model's own weights (precision.py)",
                             choices=PRECISIONS, lsp=True)
    max_new_tokens: int = setting(48, "the most tokens one suggestion decodes", min=1, max=MAX_NEW_TOKENS, lsp=True)
    reuse_min_chunk: int = setting(64, "strategy reuse: llama.cpp's --cache-reuse N", min=1)
    refresh_window: int = setting(32, "tokens pie-window and pie-refresh re-encode after an edit", min=0)
    blend_rule: str = setting("window+age", "pie-blend: which stale tokens an edit recomputes (blend.py)",
                              choices=BLEND_RULES)
    blend_ratio: float = setting(0.15, "pie-blend: the share of the stale tail an edit may recompute", min=0, max=1)
    blend_cap: int = setting(64, "pie-blend: the most stale tokens an edit recomputes", min=0)
    blend_layers: int = setting(1, "pie-blend's deviation rule: over how many layers its pool of candidates "
                                "narrows to the budget (CacheBlend)", min=1)
    blend_cursor: int = setting(0, "pie-blend: of the tokens just before the cursor, how many a completion "
                                "recomputes when stale", min=0)
    decode_kv: str = setting("auto", "the K/V a decode step reads at any precision but fp32: fp16: a copy of the "
                             "cache in fp16 (half the bytes, kept beside it); fp32: the cache itself; auto: fp16 "
                             "where the CPU computes in fp16 natively", choices=("auto", "fp16", "fp32"))
    encode_chunk: int = setting(512, "queries per forward pass when (re-)encoding long runs", min=1)
    lazy_segments: int = setting(16, "strategy lazy: compact (really rotate) past this many pending-delta runs",
                                 min=1)
    fresh_tail: int = setting(1, "tokens before the cursor run fresh for each completion", min=1)
    token_healing: bool = setting(True, "re-generate the token before the cursor, constrained to its text")
    heal_draft: bool = setting(True, "with token healing: run the token taken back in the prompt's pass too, so "
                               "that when the model types it again its next token needs no pass of its own")
    fim: str = setting("auto", "auto: keep a FIM token stream when the model has FIM tokens; off",
                       choices=("auto", "off"))
    fim_window: int = setting(128, "FIM streams: of the tokens right after the cursor (the suffix's start), how "
                              "many a completion encodes again where they were encoded as prefix", min=0)
    phi: str = setting("cursor", "the completion's first position: right after the cursor, or after the end",
                       choices=("cursor", "end"))
    multiline: bool = setting(True, "after a block-opening colon, suggest the block, not one line", lsp=True)
    max_lines: int = setting(8, "lines of a block suggestion", min=1, lsp=True)
    max_prompt_ms: int = setting(0, "bring the cache up to date within this many ms, else answer nothing "
                                 "(0: no cap)", min=0, lsp=True)
    max_predict_ms: int = setting(0, "stop decoding after this many ms, keeping the partial line (0: no cap)",
                                  min=0, lsp=True)
    verify_tokens: bool = setting(False, "check the token mirror against a full tokenization after each edit")
    cache_dir: str | None = setting(None, "where converted models are kept; none: $XDG_CACHE_HOME/livekv")

    def __post_init__(self):
        super().__post_init__()
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"unknown device {self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()
