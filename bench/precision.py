"""Each precision against fp32 on the same files and cursors: what `auto` is chosen from.

    livekv bench precision [--model M] [--lengths 1024,4096] [--points 24] [--precisions fp32,bf16,int8,int4]
                           [--rows 1,2,4,8,12,16]

For each length a real file (the scaling run's stdlib corpus) is opened once per precision and
encoded at it (`full`: the first open of a file and its first one-token completion, since a FIM
stream encodes at its first cursor), then each precision completes the same new
empty lines (one inserted, completed, removed), interleaved point by point, and is scored against
fp32's line. Reported per precision: the full
encode (ms, and × fp32's), time to first token, the whole line, decode ms/token, and agreement
with fp32. Wall
times and this process's CPU times are both kept: on a shared machine the CPU times are the
steadier ratio.

--rows times one layer's projections (qkv, o, gate_up, down) in each weight format for so many
query rows: what a batch of decode steps costs by format (BATCH_BF16 in precision.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from livekv.bench.runner import LoadMeter, cell, log, markdown
from livekv.bench.scaling import corpus
from livekv.incremental.lines import split_lines


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def points(text: str, k: int) -> list[int]:
    """k lines spread over the file that start a statement (a completion at column 0)."""
    lines = split_lines(text)
    good = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#") and i > 2]
    return [good[i] for i in sorted({int(j * len(good) / k) for j in range(k)})] if good else []


def run_length(engine, length: int, precisions: list[str], n_points: int, max_new: int, opens: int = 3) -> list[dict]:
    """Each precision's open `opens` times (in turns, so the machine's drift falls on all alike),
    then its completions at the same new lines."""
    text = corpus(engine, length)
    docs, rows = {}, []
    lines = points(text, n_points + 1)
    for k in range(opens):
        for p in precisions:
            doc = engine.open(f"file:///precision/{p}-{k}.py", text, settle=False)
            doc.configure(precision=p)  # makes the weight formats p reads: not part of any timing
            # a FIM stream encodes at its first cursor: so "full" is the open and the first completion
            _, wall, cpu = timed(lambda: (doc.settle(), doc.suggest(lines[0], 0, max_new_tokens=1, multiline=False)))
            rows.append(dict(kind="full", precision=p, length=length, tokens=doc.n, wall_ms=wall, cpu_ms=cpu))
            if k < opens - 1:
                engine.close(doc.uri)
            else:
                docs[p] = doc
    for line in lines[1:]:
        ref = None
        for p in precisions:
            # on a new empty line, as after pressing Enter: the suggestion is the line to write
            docs[p].edit((line, 0), (line, 0), "\n")
            comp, wall, cpu = timed(lambda: docs[p].suggest(line, 0, max_new_tokens=max_new, multiline=False))
            docs[p].edit((line, 0), (line + 1, 0), "")
            ref = comp.text if p == "fp32" else ref
            steps = max(comp.steps, 1)
            rows.append(dict(kind="point", precision=p, length=length, line=line, text=comp.text, ttft_ms=comp.ttft_ms,
                             line_ms=comp.total_ms,
                             decode_ms_per_token=(comp.total_ms - comp.ttft_ms) / (steps - 1) if steps > 1 else None,
                             cpu_ms_per_step=cpu / steps, agree=None if ref is None else comp.text == ref))
    for doc in docs.values():
        engine.close(doc.uri)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for length in sorted({r["length"] for r in rows}):
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731

        def opens(p, key):  # the median of a precision's opens
            return med([r[key] for r in rows if r["kind"] == "full" and r["precision"] == p and r["length"] == length])
        cpu32 = opens("fp32", "cpu_ms")
        for p in dict.fromkeys(r["precision"] for r in rows):
            full = next(r for r in rows if r["kind"] == "full" and r["precision"] == p and r["length"] == length)
            pts = [r for r in rows if r["kind"] == "point" and r["precision"] == p and r["length"] == length]
            dec = [r["decode_ms_per_token"] for r in pts if r["decode_ms_per_token"] is not None]
            scored = [r["agree"] for r in pts if r["agree"] is not None]
            cpu = opens(p, "cpu_ms")
            out.append(dict(length=length, precision=p, tokens=full["tokens"], full_ms=opens(p, "wall_ms"),
                            full_cpu_ms=cpu, full_speedup_cpu=cpu32 / cpu if cpu32 else None,
                            ttft_ms_p50=med([r["ttft_ms"] for r in pts]), line_ms_p50=med([r["line_ms"] for r in pts]),
                            decode_ms_p50=med(dec),
                            cpu_ms_per_step_p50=med([r["cpu_ms_per_step"] for r in pts]),
                            agreement=sum(scored) / len(scored) if scored else None, points=len(pts)))
    return out


def table(summary: list[dict]) -> str:
    return markdown(["tokens", "precision", "open: encode + first token ms (CPU ms, × fp32)", "first token ms p50",
                     "whole line ms p50",
                     "decode ms/token p50 (CPU ms/step)", "agreement with fp32"],
                    [[f"{s['tokens']:,}", s["precision"],
                      f"{cell(s['full_ms'])} ({cell(s['full_cpu_ms'])}, {cell(s['full_speedup_cpu'], 'x')})",
                      cell(s["ttft_ms_p50"]), cell(s["line_ms_p50"]),
                      f"{cell(s['decode_ms_p50'], 'ms1')} ({cell(s['cpu_ms_per_step_p50'], 'ms1')})",
                      f"{cell(s['agreement'], 'frac')} ({s['points']})"] for s in summary])


def projection_rows(model, rows: list[int], reps: int = 100) -> list[dict]:
    """Median µs of layer 0's four projections on (1, r, C) inputs, per weight format and r."""
    lp, width = model.precision.layers[0], model.hf.config.hidden_size
    inter = lp.down.weight.shape[1]
    out = []
    for r in rows:
        x, h = torch.randn(1, r, width), torch.randn(1, r, inter)
        for mode in ("fp32", "bf16", "int8", "int4"):
            def step():
                lp.qkv(x, mode), lp.o(x, mode), lp.gate_up(x, mode), lp.down(h, mode)
            step()  # makes the format
            times = [timed(step)[1] for _ in range(reps)]
            out.append(dict(rows=r, format=mode, us=round(1e3 * statistics.median(times), 1)))
    return out


def rows_table(timings: list[dict]) -> str:
    modes = list(dict.fromkeys(t["format"] for t in timings))
    by = {(t["rows"], t["format"]): t["us"] for t in timings}
    body = [[str(r)] + [cell(by[r, m], "n") for m in modes] for r in dict.fromkeys(t["rows"] for t in timings)]
    return markdown(["query rows"] + [f"{m} µs" for m in modes], body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="livekv bench precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="as Engine.load's (default: the embedded SmolLM2-135M)")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--points", type=int, default=24, help="completions per length (default %(default)s)")
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4", help="fp32 first: the reference")
    ap.add_argument("--opens", type=int, default=3, help="opens per precision and length, the median reported "
                    "(default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,12,16", help="query rows to time the projections at ('' skips)")
    ap.add_argument("--out", default="bench/out/precision")
    a = ap.parse_args(argv)
    precisions = [p for p in a.precisions.split(",") if p]
    if a.opens < 1:
        ap.error("--opens must be at least 1")
    if precisions[:1] != ["fp32"]:
        ap.error("--precisions must start with fp32, the reference the others are scored against")
    from livekv.incremental import Engine
    from livekv.incremental.config import PRECISIONS
    bad = [p for p in precisions if p not in PRECISIONS[1:]]
    if bad:
        ap.error(f"unknown precision(s) {bad}: choose from {','.join(PRECISIONS[1:])}")
    engine = Engine.load(a.model, precision="fp32", threads=a.threads, max_new_tokens=a.max_new_tokens)
    out, load, rows = Path(a.out), LoadMeter(), []
    out.mkdir(parents=True, exist_ok=True)
    for length in [int(x) for x in a.lengths.split(",") if x]:
        log(f"precision: {length} tokens, {','.join(precisions)}")
        rows += run_length(engine, length, precisions, a.points, a.max_new_tokens, a.opens)
        load.sample()
    summary = summarize(rows)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.json").write_text(json.dumps(dict(summary=summary, auto=engine.model.precision.resolve("auto"),
                                                      load_avg=load.summary(), argv=argv), indent=1))
    (out / "table.md").write_text(table(summary))
    print(table(summary))
    print(f"auto on this machine and model: {engine.model.precision.resolve('auto')}")
    if a.rows:
        timings = projection_rows(engine.model, [int(r) for r in a.rows.split(",")])
        (out / "rows.json").write_text(json.dumps(timings, indent=1))
        print(rows_table(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
