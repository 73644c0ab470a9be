"""The healing draft against none: how much sooner the first visible text of a completion comes.

    livekv bench heal-draft [--file PATH] [--every 5] [--reps 2] [--max-new-tokens 16]
                            [--precision auto] [--threads 1] [--model M] [--out bench/out/heal_draft]

One engine with the draft (Config.heal_draft, decode.py) and one without open the same file;
at every `--every`th line each completes at the line's start, in its middle (a pause while
typing) and at its end, the two engines taking turns (which goes first alternates by rep).
Reported by kind of cursor: how often the draft held, and the p50/p90 of call -> first visible
piece with and without it; and whether every answer was the same (it must be: the draft only
saves a pass).
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path


def first_visible_ms(doc, line: int, col: int):
    """(ms to the first streamed piece, or to the end when none came; the Completion)."""
    t0, first = time.perf_counter(), []
    comp = doc.suggest(line, col, on_piece=lambda p: first or first.append(time.perf_counter()))
    return ((first[0] if first else time.perf_counter()) - t0) * 1e3, comp


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench heal-draft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default=glob.__file__, help="the file to complete in (default: the stdlib's glob.py)")
    p.add_argument("--every", type=int, default=5, help="complete at every Nth line")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/out/heal_draft")
    a = p.parse_args(argv)
    if a.every < 1 or a.reps < 1:
        p.error("--every and --reps are counts, 1 or more")
    text = Path(a.file).read_text(encoding="utf-8")
    from livekv.incremental import Engine
    docs = {}
    for on in (True, False):
        eng = Engine.load(a.model, precision=a.precision, threads=a.threads, heal_draft=on,
                          max_new_tokens=a.max_new_tokens)
        docs[on] = eng.open(f"file:///heal_draft/{Path(a.file).name}", text)
    lines = docs[True].text.split("\n")
    kinds = {"line start": lambda ln: 0, "mid line": lambda ln: len(ln) // 2, "line end": len}
    cursors = [(kind, i, col(lines[i])) for i in range(1, len(lines), a.every) if lines[i].strip()
               for kind, col in kinds.items()]
    if not cursors:
        raise SystemExit(f"{a.file} has no non-blank line to complete at; give another --file")
    recs = []
    for rep in range(a.reps):
        for kind, line, col in cursors:
            got = {}
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                got[on] = first_visible_ms(docs[on], line, col)
            recs.append(dict(kind=kind, line=line, col=col, on_ms=got[True][0], off_ms=got[False][0],
                             drafted=got[True][1].drafted, same=got[True][1].ids == got[False][1].ids))
    rows = []
    for kind in (*kinds, "all"):
        rs = [r for r in recs if kind in ("all", r["kind"])]
        on, off = [r["on_ms"] for r in rs], [r["off_ms"] for r in rs]
        rows.append(dict(cursors=kind, n=len(rs), drafted=sum(r["drafted"] for r in rs) / len(rs),
                         on_p50=statistics.median(on), on_p90=pct(on, 0.9), off_p50=statistics.median(off),
                         off_p90=pct(off, 0.9), same=sum(r["same"] for r in rs)))
    print(f"{Path(a.file).name}, precision {docs[True].engine.precision}, {a.reps} reps\n")
    print("| cursors | completions | draft held | first visible p50 (p90) ms, draft | without | × sooner p50 "
          "| same tokens |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cursors']} | {r['n']} | {r['drafted']:.0%} | {r['on_p50']:.0f} ({r['on_p90']:.0f}) | "
              f"{r['off_p50']:.0f} ({r['off_p90']:.0f}) | {r['off_p50'] / r['on_p50']:.2f} | {r['same']} of {r['n']} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heal_draft.json").write_text(json.dumps(dict(args=vars(a), precision=docs[True].engine.precision,
                                                         rows=rows, completions=recs), indent=1))
    print(f"wrote {out / 'heal_draft.json'}", file=sys.stderr)
    return 0 if all(r["same"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
