"""The one configuration of livekv. CLI flags and LSP settings map onto its fields."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

# Update policies, all on the same code path (see strategies.py).
STRATEGIES = ("full", "prefix", "reuse", "conflict", "pie", "pie-window", "pie-refresh", "lazy")
DTYPES = ("float32", "float16", "bfloat16")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "livekv"


@dataclass
class Config:
    model: str | None = None        # None: the embedded SmolLM2-135M; a name, HF id, local dir or .gguf
    strategy: str = "pie"
    device: str | None = None       # None: cuda when available, else cpu
    dtype: str | None = None        # None: bfloat16 on cuda, float32 on cpu
    threads: int = 0                # CPU threads for torch (0: torch's default)
    max_new_tokens: int = 48
    reuse_min_chunk: int = 64       # llama.cpp's --cache-reuse N
    refresh_window: int = 32        # tokens re-encoded after an edit by pie-window / pie-refresh
    encode_chunk: int = 512         # queries per forward pass when (re-)encoding long runs
    lazy_segments: int = 16         # lazy: compact (really rotate) past this many pending-delta runs
    fresh_tail: int = 1             # tokens before the cursor re-run fresh for each completion
    token_healing: bool = True      # re-generate the token before the cursor, constrained to its text
    fim: str = "auto"               # "auto": keep a FIM token stream when the model has FIM tokens; "off"
    phi: str = "cursor"             # the target group's first position: right after the "cursor", or the "end"
    multiline: bool = True          # after a block-opening colon, suggest the block, not one line
    max_lines: int = 8              # lines of a block suggestion
    max_prompt_ms: int = 0          # bring the cache up to date within this, else answer incomplete (0: no cap)
    max_predict_ms: int = 0         # stop decoding after this, returning the partial line (0: no cap)
    verify_tokens: bool = False     # check the token mirror against a full tokenization after each edit
    cache_dir: str | None = None    # converted models; default $XDG_CACHE_HOME/livekv

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.fim not in ("auto", "off"):
            raise ValueError(f"fim must be 'auto' or 'off', got {self.fim!r}")
        if self.phi not in ("cursor", "end"):
            raise ValueError(f"phi must be 'cursor' or 'end', got {self.phi!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"unknown device {self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        for name in ("max_new_tokens", "reuse_min_chunk", "encode_chunk", "fresh_tail", "max_lines", "lazy_segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("refresh_window", "max_prompt_ms", "max_predict_ms", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def updated(self, **changes) -> "Config":
        """A validated copy with some fields changed; unknown names are refused."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}: known are {sorted(known)}")
        return replace(self, **changes)


def add_config_arguments(parser) -> None:
    """One CLI flag per Config field (--max-new-tokens for max_new_tokens, ...)."""
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {default})")
        elif f.name == "strategy":
            parser.add_argument(flag, dest=f.name, choices=STRATEGIES, default=None, help=f"(default {default})")
        else:
            typ = int if isinstance(default, int) else str
            parser.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {default})")


def config_from_arguments(ns, **overrides) -> Config:
    """The Config named by parsed CLI flags; flags left unset keep the defaults."""
    given = {f.name: getattr(ns, f.name) for f in fields(Config) if getattr(ns, f.name, None) is not None}
    given.update(overrides)
    return Config(**given)
