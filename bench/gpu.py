"""On a GPU: the rotation kernel's accuracy and bandwidth, a decode step under a CUDA graph and
torch.compile, and edit + first token on a model of Qwen2.5-Coder-0.5B's size, in one run.

    livekv bench gpu [--out DIR] [--parts kernel,decode,edit,compile] [--lengths 2048,8192,16384]
    livekv bench gpu --dry-run      tiny shapes on the CPU, the Triton kernel under TRITON_INTERPRET=1

Parts, in order (bench/gpu_kernel.py, gpu_decode.py, gpu_edit.py):
  kernel   rerotate_keys_triton_ and rerotate_keys_torch_ against the fp64 reference (error), and
           their GB/s (keys read + written / CUDA-event time) next to a plain copy_'s
  decode   one decode step of Transformer.forward at a fixed cache length: eager as the engine's
           decode loop calls it, eager at a fixed shape, and that call captured in a CUDA graph
  edit     `full` against `pie`: edit + first token (doc.edit, then a one-token completion below
           it), p50 over a few edits at 2k, 8k and 16k tokens, on random weights of the coder's
           shape (timing does not depend on the weights; its GGUF cannot travel to the GPU)
  compile  the fixed-shape step under torch.compile(mode="reduce-overhead"): compile time, ms/step
Each part runs under a time limit and a guard: one that fails or runs out of time records why,
and the parts after it still run. gpu.json and gpu.md (a table per part) are rewritten after every
part; the exit status is 1 when a part failed.

On the lent GPU machine (the device tool's `run`, nothing to carry; timeout_s 540):

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/lk . && set -o pipefail && PYTHONPATH=/tmp/lk PYTHONUNBUFFERED=1 python3 -P -m livekv bench gpu --out $OUT 2>&1 | tee $OUT/gpu.log

pip puts livekv (this tree) under /tmp/lk without its dependencies: the script imports only torch
(CUDA), triton, transformers, tokenizers and numpy, all in that machine's image (livekv's other
dependencies, gguf, tree-sitter and the servers' packages, are not imported). `-P` keeps the
repository root off sys.path: its top-level kernels/ would shadow the `kernels` package that
transformers looks for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

PARTS = ("kernel", "decode", "edit", "compile")
# seconds each part may run: together well inside one device command (10 minutes)
LIMITS = {"kernel": 60, "decode": 60, "edit": 180, "compile": 180}


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout("ran out of its time limit")


class Bench:
    """What every part shares: the device, the sizes (dry run or real), one timer, one engine."""

    def __init__(self, args):
        import torch
        self.args, self.dry = args, args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.dtype = torch.float32 if self.dry else getattr(torch, args.dtype)
        self._engine = None

    def engine(self):
        """The model every model part runs: coder-size random weights, or a tiny Llama when dry."""
        if self._engine is None:
            from livekv.bench.synthetic_models import coder_size, tiny_llama, train_tokenizer
            tok = train_tokenizer()
            self._engine = (tiny_llama(tok, verify_tokens=False) if self.dry
                            else coder_size(tok, self.device, self.dtype))
        return self._engine

    def median_ms(self, fn, reps: int = 20, warmup: int = 3) -> float:
        """Median ms of fn() after warm-up: CUDA events on the GPU, the host clock on the CPU (a
        dry run only checks that numbers come out: 3 reps after 1 warm-up)."""
        if self.dry:
            reps, warmup = 3, 1
        return median_ms(fn, reps, warmup, cuda_ms if self.device == "cuda" else host_ms)


def host_ms(fn) -> float:
    """ms of one call of fn by the host clock."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cuda_ms(fn) -> float:
    """ms of one call of fn on the GPU, by CUDA events."""
    import torch
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median_ms(fn, reps: int = 20, warmup: int = 3, one=host_ms) -> float:
    """Median ms of fn() over reps calls after warmup calls, each timed by one(fn)."""
    for _ in range(warmup):
        fn()
    return statistics.median(one(fn) for _ in range(reps))


def environment(dry: bool) -> dict:
    import torch
    import transformers
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               transformers=transformers.__version__, dry_run=dry,
               triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    return env


def run_part(name: str, bench: Bench) -> dict:
    """One part under its time limit; its rows and notes, or what went wrong."""
    from livekv.bench import gpu_decode, gpu_edit, gpu_kernel
    fn = {"kernel": gpu_kernel.run, "decode": gpu_decode.run, "edit": gpu_edit.run,
          "compile": gpu_decode.run_compiled}[name]
    out = {"rows": [], "notes": [], "error": None}
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMITS[name])
    try:
        fn(bench, out["rows"], out["notes"])  # rows appended as they come: a timeout keeps them
    except Exception as e:  # noqa: BLE001 - a part's failure (or PartTimeout) must not lose the others' results
        out["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return " ".join(str(v).splitlines()).replace("|", "\\|")  # one cell, on the row's one line


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"# livekv bench gpu{' --dry-run' if env['dry_run'] else ''}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "dry_run"), ""]
    for name, part in results["parts"].items():
        lines += [f"## {name} ({part['seconds']} s)", ""]
        rows = part["rows"]
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
        lines += [f"- {n}" for n in part["notes"]]
        if part["error"]:
            lines.append(f"- **failed**: {part['error']}")
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    (out / "gpu.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/out/gpu",
                   help="where gpu.json and gpu.md go (default: $OUT, else bench/out/gpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU (a tiny random Llama, Triton interpreted): checks the script")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--lengths", default=None, help="edit part: file tokens (default 2048,8192,16384; dry: 128,256)")
    p.add_argument("--edits", type=int, default=3, help="edit part: timed edits per length (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the model's dtype on CUDA")
    a = p.parse_args(argv)
    parts = [s for s in a.parts.split(",") if s]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"--parts: unknown {bad} (choose from {','.join(PARTS)})")
    if a.edits < 1:
        p.error("--edits must be at least 1")
    if a.dry_run:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print(f"livekv bench gpu: torch {torch.__version__} sees no CUDA device, and this benchmark measures "
              "one; run it on a GPU machine (see `livekv bench gpu --help`), or add --dry-run to check the "
              "script on the CPU with tiny shapes", file=sys.stderr)
        return 2
    bench = Bench(a)
    results = {"env": environment(a.dry_run), "parts": {}}
    out = Path(a.out)
    for name in parts:
        print(f"# {name} ...", file=sys.stderr, flush=True)
        results["parts"][name] = run_part(name, bench)
        write(results, out)
    print(markdown(results))
    failed = [n for n, r in results["parts"].items() if r["error"]]
    if failed:
        print(f"livekv bench gpu: part(s) {', '.join(failed)} failed (see above); the others' results "
              f"are in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
