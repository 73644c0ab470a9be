"""torch.compile (Inductor) of one decode step on the CPU, against the same step eager.

    livekv bench compile-cpu [--model M] [--cache-tokens 1024] [--reps 30] [--threads 1]

The step is the fixed-shape one that bench/gpu.py captures on a GPU (gpu_decode.Step: one token
over a cache of random K/V, every column visible, fp32), so Dynamo sees one shape. Reported: the
engine's own step and the fixed step eager, the compiled step, the compile time (its first three
calls) and the largest logit difference from eager. It tells whether compiling the decode step
is worth its start-up on this machine; the engine does not compile.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path


def measure(engine, n: int, reps: int) -> dict:
    """The step at n cached tokens: the engine's and the fixed one eager, then compiled."""
    import torch
    import torch._dynamo

    from livekv.bench.gpu import median_ms
    from livekv.bench.gpu_decode import Step
    step = Step(types.SimpleNamespace(engine=lambda: engine), n)
    eager = step.fixed().clone()
    engine_ms, eager_ms = median_ms(step.engine_step, reps), median_ms(step.fixed, reps)
    for buf in (step.kv.k, step.kv.v):  # written in place: static, as the weights are
        torch._dynamo.mark_static_address(buf)
    torch._dynamo.reset()
    compiled = torch.compile(step.fixed_no_grad)

    def run():
        with torch.no_grad():
            return compiled()
    t0 = time.perf_counter()
    for _ in range(3):
        out = run()
    compile_s = time.perf_counter() - t0
    compiled_ms = median_ms(run, reps)
    return dict(cache_tokens=n, engine_step_ms=engine_ms, fixed_eager_ms=eager_ms, compiled_ms=compiled_ms,
                x_vs_eager=eager_ms / compiled_ms, compile_s=compile_s,
                max_logit_diff=(out.float() - eager.float()).abs().max().item(), torch=torch.__version__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="livekv bench compile-cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="as Engine.load's (default: the embedded SmolLM2-135M)")
    ap.add_argument("--cache-tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/out/compile_cpu")
    a = ap.parse_args(argv)
    from livekv.incremental import Engine
    r = measure(Engine.load(a.model, precision="fp32", threads=a.threads), a.cache_tokens, a.reps)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "compile_cpu.json").write_text(json.dumps(dict(r, threads=a.threads), indent=1))
    print(f"{r['cache_tokens']} cached tokens, {a.threads} thread(s): engine step {r['engine_step_ms']:.1f} ms, "
          f"fixed step eager {r['fixed_eager_ms']:.1f} ms, compiled {r['compiled_ms']:.1f} ms "
          f"({r['x_vs_eager']:.2f}x eager), compile {r['compile_s']:.1f} s, "
          f"max logit difference {r['max_logit_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
