"""
A run folder's results.json and table.md, rebuilt from the raw records it holds.

    livekv bench report bench/out/run1     # recompute results.json, table.md and the plots

Each phase of `livekv bench replay` streams its records (records.jsonl, curve.jsonl,
scaling.jsonl) and notes what it ran in run.json under the same name; build() summarizes whatever is there, so a run
cut short, or phases run one after another into the same --out, still gives results.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from livekv.bench import metrics


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_part(out: Path, name: str, meta: dict) -> None:
    """Record in run.json what phase `name` ran (its settings, counts and load average)."""
    path = out / "run.json"
    run = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    run[name] = meta
    path.write_text(json.dumps(run, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path) -> dict:
    """Summarize the run folder into results.json and table.md; returns the results."""
    out = Path(out)
    run = json.loads((out / "run.json").read_text(encoding="utf-8")) if (out / "run.json").exists() else {}
    if not run:
        raise ValueError(f"{out} holds no run.json: it is not a folder written by `livekv bench replay`")
    records = read_jsonl(out / "records.jsonl")
    rep = run.get("records", {})
    labels = rep.get("strategies") or list(dict.fromkeys(r["label"] for r in records))
    strategies = metrics.summarize(records, labels) if records else {}
    any_meta = next(iter(run.values()))
    res = {"model": any_meta.get("model"), "traces": rep.get("traces", []),
           "edits": max((m["points"] for m in strategies.values()), default=0),
           "strategies": strategies, "run": run}
    scaling_rows = read_jsonl(out / "scaling.jsonl")
    if scaling_rows:
        res["scaling"] = metrics.summarize_scaling(scaling_rows)
    curve_rows = read_jsonl(out / "curve.jsonl")
    if curve_rows:
        res["agreement_curve"] = dict(metrics.summarize_curve(curve_rows), trace=run.get("curve", {}).get("trace"))
    (out / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "table.md").write_text(markdown(res), encoding="utf-8")
    return res


# ---------------------------------------------------------------- markdown

def _fmt(x, kind: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return {"frac": f"{x:.3f}", "ms": f"{x:,.0f}", "x": f"{x:.2f}×", "n": f"{x:,.0f}", "kl": f"{x:.4f}"}[kind]


COLUMNS = [("exact_match", "EM", "frac"), ("edit_similarity", "ES", "frac"),
           ("agreement_with_full", "agree w/ full", "frac"),
           ("agreement_nonempty", "agree w/ full (full non-empty)", "frac"), ("kl_mean", "KL from full", "kl"),
           ("top1_mean", "top-1 w/ full (8 forced)", "frac"), ("apply_ms_p50", "apply p50 ms", "ms"),
           ("apply_ms_p95", "apply p95 ms", "ms"), ("ttft_ms_p50", "TTFT p50 ms", "ms"),
           ("ttft_ms_p95", "TTFT p95 ms", "ms"), ("speedup_vs_full", "speed-up vs full", "x"),
           ("tokens_encoded_mean", "tokens encoded (mean)", "n")]


def strategy_table(strategies: dict) -> str:
    rows = ["| strategy | points | " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for lab, m in strategies.items():
        rows.append(f"| {lab} | {m['points']} | " + " | ".join(_fmt(m[k], kind) for k, _, kind in COLUMNS) + " |")
    return "\n".join(rows) + "\n"


def scaling_table(summary: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in summary))
    head = ["| file tokens | " + " | ".join(f"{lab}" for lab in labels) + " |", "|" + "---|" * (len(labels) + 1)]

    def table(cell) -> list[str]:  # one row per length, cell(summary row) per label
        rows = list(head)
        for n in dict.fromkeys(r["length"] for r in summary):
            cells = {r["label"]: r for r in summary if r["length"] == n}
            toks = next(iter(cells.values()))["file_tokens"]
            rows.append(f"| {toks:,} | " + " | ".join(cell(cells[lab]) if lab in cells else "–" for lab in labels) + " |")
        return rows

    rows = table(lambda r: f"{_fmt(r['apply_ms_p50'], 'ms')} + {_fmt(r['ttft_ms_p50'], 'ms')}")
    if any(r.get("rearrange_ms_p50") is not None for r in summary):
        rows += ["\nOf the apply time, updating the cache alone (moving and rotating keys; `lazy`: recording "
                 "deltas), median ms:\n"]
        rows += table(lambda r: "–" if r.get("rearrange_ms_p50") is None else f"{r['rearrange_ms_p50']:.1f}")
    compact = [r for r in summary if r.get("compact_ms")]
    if compact:
        rows.append("\nOne compaction (the rotation lazy defers; it runs once the pending deltas split the file "
                    "into more than `lazy_segments` runs): " + ", ".join(
                        f"{r['file_tokens']:,} tokens {_fmt(r['compact_ms'], 'ms')} ms" for r in compact) + ".")
    return "\n".join(rows) + "\n"


def curve_table(c: dict) -> str:
    e = c["buckets"]
    spans = [f"edits {a + 1}–{b}" for a, b in zip(e, e[1:])]
    cost = "apply_ms_p50" in c
    probes = sorted({p for v in c.get("by_probe", {}).values() for p in v})
    redo = "recomputed_mean" in c
    extra = "".join(f" probe: {p} |" for p in probes) + " KL from full | top-1 (8 forced) |" * ("kl_mean" in c)
    extra += " recomputed / edit (share of stale) |" * redo
    extra += " edit p50 ms | × below full | idle refresh p50 ms |" if cost else ""
    first = "first_token_ms_p50" in c
    extra += " first token p50 ms |" * first
    n_cols = len(spans) + 2 + len(probes) + 2 * ("kl_mean" in c) + redo + 3 * cost + first
    rows = ["| strategy | all edits | " + " | ".join(spans) + " |" + extra, "|" + "---|" * n_cols]
    for lab, v in c["overall"].items():
        tail = "".join(f" {_fmt(c['by_probe'][lab].get(p), 'frac')} |" for p in probes)
        if "kl_mean" in c:
            tail += f" {_fmt(c['kl_mean'][lab], 'kl')} | {_fmt(c['top1_mean'][lab], 'frac')} |"
        if redo:
            share = c["recomputed_share"].get(lab)
            cursor = c.get("recomputed_at_cursor", {}).get(lab)
            tail += (f" {_fmt(c['recomputed_mean'][lab], 'n')}" + (f" ({share:.1%})" if share is not None else "")
                     + (f" + {_fmt(cursor, 'n')} at the cursor" if cursor else "") + " |")
        tail += (f" {_fmt(c['apply_ms_p50'][lab], 'ms')} | {_fmt(c['apply_below_full'][lab], 'x')} | "
                 f"{_fmt(c['idle_refresh_ms_p50'][lab], 'ms')} |") if cost else ""
        tail += f" {_fmt(c['first_token_ms_p50'][lab], 'ms')} |" if first else ""
        rows.append(f"| {lab} | {_fmt(v, 'frac')} | " + " | ".join(_fmt(x, 'frac') for x in c["by_bucket"][lab]) + " |"
                    + tail)
    return "\n".join(rows) + "\n"


def markdown(res: dict) -> str:
    parts = []
    if res["strategies"]:
        parts.append(f"Model {res['model']}, {res['edits']} prediction points per strategy.\n\n"
                     + strategy_table(res["strategies"]))
    if "scaling" in res:
        parts.append("Scaling: median apply + time to first token (ms) against file length.\n\n"
                     + scaling_table(res["scaling"]))
    if "agreement_curve" in res:
        c = res["agreement_curve"]
        parts.append(f"Agreement with full over {c['edits']} sequential line edits of {c['trace']}.\n\n"
                     + curve_table(c))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="livekv bench report", description="recompute results.json, table.md and "
                                 "the plots of a run folder from its records")
    ap.add_argument("run", metavar="RUN_FOLDER")
    run = Path(ap.parse_args(argv).run)
    from livekv.bench import plots
    try:
        res = build(run)
    except ValueError as e:
        print(f"[report] error: {e}", file=sys.stderr)
        return 2
    plots.plot_all(run, res)
    print((run / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
