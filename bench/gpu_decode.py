"""`livekv bench gpu`, parts decode and compile: one decode step of the engine's forward
(Transformer.forward) at a fixed cache length, eager and captured.

What is captured: Transformer.forward itself, for one token at slot n-1 attending to every
column [0, n), with its inputs already on the GPU and no mask (Layout(kv, None, n_keys=n)). At
that fixed shape the forward has no host work that a capture cannot replay: no mask to copy over
(the engine's decode builds a CPU mask per step, and PendingDeltas reads it back on the host),
no pending deltas. The engine's own step, as decode.py calls it (CPU tensors, a mask, the Layout
built per step), is timed beside it, eager. The KV cache holds random keys and values: the time
does not depend on them.
"""
from __future__ import annotations

import sys
import time

import torch
from torch._dynamo.utils import counters

from livekv.incremental.batch import Pass
from livekv.incremental.layout import Layout

CACHE_LENGTHS = (4096, 16384)
DRY_CACHE_LENGTHS = (64,)


class Step:
    """One decode step at a fixed cache length n, on a cache of random K/V."""

    def __init__(self, bench, n: int):
        self.eng, self.n = bench.engine(), n
        m = self.eng.model
        self.kv = self.eng.new_cache(n)
        g = torch.Generator(device="cpu").manual_seed(n)
        for buf in (self.kv.k, self.kv.v):                                 # (L, Hkv, n, D)
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
        self.token = int(self.eng.mirror.tokenize("return")[0][0])
        dev = m.device
        self.ids, self.pos, self.at = (torch.tensor([self.token], device=dev), torch.tensor([n - 1], device=dev),
                                       torch.zeros(1, dtype=torch.long, device=dev))
        self.fixed_layout = Layout(self.kv, None, n_keys=n)

    def engine_step(self) -> torch.Tensor:
        """As decode.py's loop: host tensors, a host mask, the Layout built per step."""
        lay = Layout(self.kv, torch.ones(1, self.n, dtype=torch.bool))
        return self.eng.model.forward(self.kv, torch.tensor([self.token]), torch.tensor([self.n - 1]), self.n - 1,
                                      lay, logits_at=torch.arange(1), precision="fp32")

    def fixed_no_grad(self) -> torch.Tensor:
        """fixed() under no_grad instead of inference_mode, for torch.compile: Dynamo's guards on
        tensors it makes of the layout's numpy arrays fail inside inference mode."""
        step = Pass(self.kv, self.ids, self.pos, self.n - 1, self.fixed_layout, logits_at=self.at, precision="fp32")
        return type(self.eng.model).run.__wrapped__(self.eng.model, [step])[0]

    def fixed(self) -> torch.Tensor:
        """The fixed-shape step: device inputs, no mask; what is captured."""
        return self.eng.model.forward(self.kv, self.ids, self.pos, self.n - 1, self.fixed_layout,
                                      logits_at=self.at, precision="fp32")


def capture(fn):
    """(replay, output, seconds): fn captured in a CUDA graph after a warm-up on a side stream."""
    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph.replay, out, time.perf_counter() - t0


def run(bench, rows: list, notes: list) -> None:
    lengths = DRY_CACHE_LENGTHS if bench.dry else CACHE_LENGTHS
    notes.append("captured: Transformer.forward for 1 token at a fixed cache length, inputs on the device, no mask "
                 "(every column visible); `engine step` is the same forward as decode.py calls it (host tensors, "
                 "host mask, layout built per step), eager")
    if bench.device != "cuda":
        notes.append("dry run: no CUDA, so `cuda graph` replays the eager call (the timing and the logit check "
                     "run, the capture does not)")
    for n in lengths:
        print(f"  decode: {n} cached tokens", file=sys.stderr, flush=True)
        step = Step(bench, n)
        eager = step.fixed().clone()
        if bench.device == "cuda":
            replay, out, secs = capture(step.fixed)
        else:
            replay, out, secs = step.fixed, eager, 0.0
        replay()
        err = (out.float() - eager.float()).abs().max().item()
        base = bench.median_ms(step.engine_step)
        for variant, fn in (("engine step (eager)", step.engine_step), ("fixed shape (eager)", step.fixed),
                            ("cuda graph replay", replay)):
            ms = base if fn is step.engine_step else bench.median_ms(fn)
            rows.append(dict(cache_tokens=n, variant=variant, ms_per_step=ms, x_vs_engine_step=base / ms,
                             setup_s=round(secs, 2) if variant.startswith("cuda") else "",
                             max_logit_diff_vs_eager=err if variant.startswith("cuda") else ""))
        del step, replay, out


def run_compiled(bench, rows: list, notes: list) -> None:
    """The fixed-shape step under torch.compile: mode reduce-overhead (Inductor + CUDA graphs) on
    the GPU; on a dry run backend "eager", which checks that Dynamo traces the forward."""
    dev = bench.device
    mode = dict(mode="reduce-overhead") if dev == "cuda" else dict(backend="eager")
    notes.append(f"torch.compile({', '.join(f'{k}={v!r}' for k, v in mode.items())}) of the fixed-shape step "
                 "(part decode); compile_s is its first three calls (reduce-overhead records its graphs by then); a "
                 "graph break (PendingDeltas' test of the layout's numpy deltas) splits it into several graphs")
    torch._dynamo.reset()
    counters.clear()
    for n in (DRY_CACHE_LENGTHS if bench.dry else CACHE_LENGTHS[:1]):
        step = Step(bench, n)
        eager = step.fixed().clone()
        for buf in (step.kv.k, step.kv.v):  # the cache is written in place: static, as parameters are
            torch._dynamo.mark_static_address(buf)
        compiled = torch.compile(step.fixed_no_grad, **mode)

        def fn():
            with torch.no_grad():
                return compiled()

        t0 = time.perf_counter()
        for _ in range(3):  # reduce-overhead records its graph on the second or third call
            out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        err = (out.float() - eager.float()).abs().max().item()
        eager_ms = bench.median_ms(step.fixed)
        ms = bench.median_ms(fn)
        rows.append(dict(cache_tokens=n, variant="fixed shape (eager)", ms_per_step=eager_ms))
        rows.append(dict(cache_tokens=n, variant="torch.compile " + next(iter(mode.values())), ms_per_step=ms,
                         x_vs_eager=eager_ms / ms, compile_s=round(secs, 1), max_logit_diff_vs_eager=err,
                         graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                         cudagraph_skips=counters["inductor"]["cudagraph_skips"]))
