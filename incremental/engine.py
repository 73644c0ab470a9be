"""The engine: one loaded model and tokenizer, and the live documents that share them."""
from __future__ import annotations

import logging
import time

import torch

from .config import Config
from .decode import FP16_KV_PEAK, reads_fp16
from .document import Document
from .fim import FimStream, fim_ids
from .format_store import STORED, FormatStore
from .host_memory import keep_freed_memory, release_freed_memory
from .kv_cache import KVCache
from .models import load_model, resolve_device_dtype
from .token_mirror import TokenMirror
from .strategies import check
from .transformer import Transformer

log = logging.getLogger("livekv")


class Engine:
    """Holds the model; opens documents, each with its own KV cache.

    Not thread-safe: drive an engine from one thread (the LSP server uses one worker thread).
    """

    def __init__(self, config: Config, hf, tokenizer, name: str):
        self.config, self.tokenizer, self.model_name = config, tokenizer, name
        self.model = Transformer(hf)
        self.mirror = TokenMirror(tokenizer, verify=config.verify_tokens)
        gen = getattr(hf, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = frozenset(int(t) for t in list(tokenizer.all_special_ids) + eos)
        self.documents: dict[str, Document] = {}
        self.fim_ids = fim_ids(tokenizer)
        self._vocab_text: list[str] | None = None
        self._healing: dict[str, torch.Tensor] = {}
        probe = self.mirror.tokenize("def add(a, b):\n    return a + b\n")[0].tolist()[:12]
        self.model.check_against_hf(self.new_cache, probe)
        if config.token_healing:  # the vocabulary's text, which healing masks are made from: not on a first completion
            self.vocab_text()

    @classmethod
    def load(cls, model: str | None = None, strategy: str = "pie", device: str | None = None,
             dtype: str | None = None, **settings) -> "Engine":
        """Load a model: None is the embedded SmolLM2-135M (offline); "qwen2.5-coder-0.5b" the
        optional coder; else a HF id, local directory or .gguf file of a RoPE causal LM.
        Other Config fields may be given as keyword arguments."""
        config = Config(model=model, strategy=strategy, device=device, dtype=dtype, **settings)
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: Config) -> "Engine":
        t0 = time.perf_counter()
        dev, dt = resolve_device_dtype(config.device, config.dtype)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(0)
        if dev.type == "cpu":
            keep_freed_memory()
        hf, tok, name = load_model(config.model, dev, dt, config.cache_path)
        eng = cls(config, hf, tok, name)
        P = eng.model.precision
        store = FormatStore(config.cache_path, P.weights()) if dev.type == "cpu" else None
        if store is not None:  # the formats an earlier load of these weights made: before auto is decided
            P.adopt(store.read())
        chosen = eng.precision
        if chosen in ("int8", "int4") and dev.type != "cpu":
            raise ValueError(f"precision {chosen} runs on the CPU only (torch's {chosen} weight kernel); "
                             f"use bf16 on {dev}")
        P.prepare(chosen)
        if store is not None:
            store.write(P.stored(STORED))
            P.trim(chosen)
        P.reload = lambda: load_model(config.model, dev, dt, config.cache_path)[0]
        released = P.release(chosen)
        if dev.type == "cpu":  # loading's temporaries (dequantized blocks, the vocabulary's decode) are not kept
            release_freed_memory()
        log.info("loaded %s on %s/%s in %.1fs; precision %s%s%s", name, dev, str(dt).removeprefix("torch."),
                 time.perf_counter() - t0, chosen, " (auto)" if config.precision == "auto" else "",
                 "; the projections' weights as loaded are not kept (none of its passes reads them)" if released else "")
        if dev.type == "cpu" and chosen != "fp32" and config.decode_kv != "fp32":  # what reads_fp16 decided, and why
            peak = eng.model.kv_peak
            log.info("decode steps read %s", "an fp16 copy of the cache" if reads_fp16(config, eng.model) else
                     f"the fp32 cache: this model's K/V reach {peak:.0f}, past fp16's safe range" if peak > FP16_KV_PEAK
                     else "the fp32 cache: this CPU computes fp16 by conversion, slower than fp32 "
                     "(decode_kv fp16 forces the copy)")
        return eng

    @property
    def precision(self) -> str:
        """The precision the engine's config stands for on its device (precision.resolve)."""
        return self.model.precision.resolve(self.config.precision)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def vocab_text(self) -> list[str]:
        """Each token id's text ("\\0" for stop tokens, which healing never picks), decoded once."""
        if self._vocab_text is None:
            V = self.model.vocab_size
            text = self.tokenizer.batch_decode([[i] for i in range(V)], skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)
            self._vocab_text = [t if i not in self.stop_ids else "\0" for i, t in enumerate(text)]
        return self._vocab_text

    def healing_mask(self, prefix: str) -> torch.Tensor:
        """(V,) bool: the tokens whose text starts with prefix (cached per prefix)."""
        mask = self._healing.get(prefix)
        if mask is None:
            mask = torch.tensor([t.startswith(prefix) for t in self.vocab_text()], dtype=torch.bool)
            if len(self._healing) > 256:
                self._healing.clear()
            self._healing[prefix] = mask
        return mask.to(self.model.device)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty KV cache for this model, room for `capacity` slots to begin with."""
        m = self.model
        return KVCache(m.n_layers, m.n_kv_heads, m.head_dim, m.dtype, m.device, m.inv_freq, capacity=capacity)

    def open(self, uri: str, text: str, strategy: str | None = None, settle: bool = True,
             progress=None, should_stop=None) -> Document:
        """Open (or reopen, replacing) a document and encode it once.

        progress(done, total) reports the encoding; should_stop() may interrupt it, leaving the
        rest to be encoded by the next edit or completion (Document.settle)."""
        strategy = check(self.config.strategy if strategy is None else strategy)
        if not isinstance(text, str):
            raise ValueError(f"document text must be a str, got {type(text).__name__}")
        if self.fim_ids is not None and self.config.fim != "off":
            doc = FimStream.open(self, uri, text, strategy)
        else:
            doc = Document(self, uri, text, strategy)
            if settle:
                doc.settle(should_stop, progress=progress)
        self.documents[uri] = doc
        return doc

    def get(self, uri: str) -> Document:
        try:
            return self.documents[uri]
        except KeyError:
            raise KeyError(f"document {uri!r} is not open; open it first") from None

    def close(self, uri: str) -> None:
        doc = self.documents.pop(uri, None)
        if doc is not None:
            doc.close()
