"""What one batched decode step costs against the number of passes in it, in-process.

    livekv bench team-step [--passes 1,2,4,8] [--file-tokens 600] [--context-files 3]
                           [--context-tokens 800] [--steps 8] [--reps 3] [--precision auto]
                           [--threads 1] [--model M] [--decode-kv auto] [--out bench/out/team_step]

The documents of `livekv bench team` (bench/team.py: stdlib modules as the editors' files, the
same context files for all, held once in a cache of their own), without the servers: k documents
each start a completion in one Scheduler (batch.py), and once every first pass has run, the next
`--steps` decode steps of all k together are timed. Reported per k: ms per step (the best of
`--reps` runs, each the mean of its steps) and its ratio to one pass alone, which is what the
team benchmark's batched server can gain over the serial one at that width.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def documents(engine, a: argparse.Namespace) -> list:
    """max(passes) editors' documents, each in its own cache, seeing the shared contexts."""
    from livekv.incremental.document import Document

    from .team import inputs
    own, ctx = inputs(argparse.Namespace(**vars(a), editors=[max(a.passes)]), engine.tokenizer)
    shared = engine.new_cache(4096)
    contexts = []
    for uri, text in ctx.items():  # groups from one base, as the server's shared store places them
        d = Document(engine, uri, text, "pie", kv=shared, pos0=0)
        d.settle()
        contexts.append(d)
    base = max((d.n for d in contexts), default=0) + 1
    docs = []
    for uri, text in own[: max(a.passes)]:
        d = Document(engine, uri, text, "pie", pos0=base, sees=contexts)
        d.settle()
        docs.append(d)
    return docs


def cursor(doc, steps: int) -> tuple[int, int]:
    """A cursor (at a code line's indentation) whose completion, alone, runs `steps` tokens or
    more; the first such from a third of the way down."""
    lines = doc.text.split("\n")
    code = [i for i, ln in enumerate(lines) if len(ln.strip()) > 12] or [0]
    for line in (code[len(code) // 3:] + code[: len(code) // 3])[:12]:
        col = len(lines[line]) - len(lines[line].lstrip())
        if doc.suggest(line, col, max_new_tokens=steps, multiline=True).steps >= steps:
            return line, col
    return line, col


def step_ms(engine, docs: list, cursors: list, steps: int, max_new: int) -> float | None:
    """Mean ms of up to `steps` decode steps with every document's completion in them, until the
    first one ends (None when one ended within two: too little to time)."""
    from livekv.incremental.batch import Scheduler
    sched = Scheduler(engine.model)
    for d, (line, col) in zip(docs, cursors):
        sched.add(d.suggesting(line, col, max_new_tokens=max_new, multiline=True), lambda value, error: None)
    sched.step()  # the first passes: the prompts' tails
    t0, k = time.perf_counter(), 0
    while k < steps and len(sched) == len(docs):
        sched.step()
        k += 1
    ms = (time.perf_counter() - t0) * 1e3 / k if k >= 2 else None
    while len(sched):
        sched.step()
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench team-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", default="1,2,4,8", help="passes per step to time, comma-separated")
    p.add_argument("--file-tokens", type=int, default=600)
    p.add_argument("--context-files", type=int, default=3)
    p.add_argument("--context-tokens", type=int, default=800)
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per run")
    p.add_argument("--reps", type=int, default=3, help="runs per width; the best is reported")
    p.add_argument("--precision", default="auto")
    p.add_argument("--decode-kv", default="auto", choices=("auto", "fp16", "fp32"), help="Config.decode_kv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/out/team_step")
    a = p.parse_args(argv)
    a.passes = sorted({int(x) for x in a.passes.split(",")})
    if a.passes[0] < 1:
        p.error("--passes are counts of documents, 1 or more")
    from livekv.incremental import Engine
    engine = Engine.load(a.model, precision=a.precision, decode_kv=a.decode_kv, threads=a.threads,
                         max_new_tokens=a.steps + 8)
    docs = documents(engine, a)
    cursors = [cursor(d, a.steps + 2) for d in docs]
    rows = []
    for k in a.passes:
        runs = [m for m in (step_ms(engine, docs[:k], cursors[:k], a.steps, a.steps + 8) for _ in range(a.reps))
                if m is not None]
        if not runs:
            raise SystemExit(f"a completion ended within two steps at every run for {k} passes: nothing to "
                             "time; give the editors more of their files (--file-tokens)")
        rows.append(dict(passes=k, step_ms=min(runs)))
    one = rows[0]["step_ms"] if a.passes[0] == 1 else None
    print("| passes | ms per step | × one pass alone | ms per pass |\n|---|---|---|---|")
    for r in rows:
        r["x_one"] = r["step_ms"] / one if one else None
        x = f"{r['x_one']:.2f}" if one else ""
        print(f"| {r['passes']} | {r['step_ms']:.1f} | {x} | {r['step_ms'] / r['passes']:.1f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "team_step.json").write_text(json.dumps(dict(args=vars(a), precision=engine.precision, rows=rows),
                                                   indent=1))
    print(f"wrote {out / 'team_step.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
