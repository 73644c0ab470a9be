"""
Scores of the edit-replay benchmark: how a prediction compares with the truth and with `full`,
and the per-strategy summary of results.json / table.md.

Comparison: every prediction point of a trace sits at column 0,
so the predicted line is exactly the completion text. Both sides are compared after dropping
trailing whitespace (and any "\\r"); leading whitespace is kept, since indentation is code.

- exact match:        normalized prediction == normalized truth.
- edit similarity:    1 - Levenshtein(pred, truth) / max(len(pred), len(truth)), over code
                      points; 1.0 when both are empty.
- agreement_with_full: normalized prediction == normalized prediction of `full` at the same
                      point of the same run (full is the exact, re-encode-everything reference).

Latency: apply_ms is the time edit_batch took (token mirror, cache moves and rotations, encoding);
ttft_ms the time from asking for the completion to its first decoded token; the user-visible
latency of a point is apply_ms + ttft_ms. Percentiles are numpy's (linear interpolation) over the
prediction points. speedup_vs_full = median(full's apply+ttft) / median(this strategy's), both
over the same points of the same run.
"""
from __future__ import annotations

import numpy as np

REFERENCE = "full"


def normalize(line: str) -> str:
    return line.rstrip()  # trailing whitespace and line-ending debris; indentation is kept


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; unit costs) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(pred: str, truth: str) -> float:
    a, b = normalize(pred), normalize(truth)
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - levenshtein(a, b) / n


def exact_match(pred: str, truth: str) -> bool:
    return normalize(pred) == normalize(truth)


def percentile(xs, q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def divergence(ref, lp, forced: list[int]) -> tuple[float, float | None]:
    """(KL(ref || lp) of the first rows' distributions, lp's teacher-forced top-1 agreement with
    the forced tokens): ref and lp are (len(forced) + 1, V) log-probabilities."""
    import torch
    p = ref[0].exp()
    kl = float(torch.where(p > 0, p * (ref[0] - lp[0]), torch.zeros_like(p)).sum().clamp_min(0))
    if not forced:
        return kl, None
    return kl, float((lp[: len(forced)].argmax(-1) == torch.tensor(forced)).float().mean())


def score_point(recs: list[dict]) -> None:
    """Fill agree_full, and exact/edit_similarity where there is a truth, into the records of one
    prediction point (one record per strategy label, all at the same place of the same document)."""
    ref = next((r["pred"] for r in recs if r["label"] == REFERENCE), None)
    for r in recs:
        if r.get("truth") is not None:
            r["exact"] = exact_match(r["pred"], r["truth"])
            r["edit_similarity"] = edit_similarity(r["pred"], r["truth"])
        r["agree_full"] = None if ref is None else normalize(r["pred"]) == normalize(ref)


def _point(r: dict) -> tuple:
    return r.get("trace"), r.get("step"), r.get("edit"), r.get("probe")


def summarize(records: list[dict], labels: list[str]) -> dict:
    """Per-strategy metrics over the prediction records (those with a "pred")."""
    points = [r for r in records if r.get("pred") is not None]
    by = {lab: [r for r in points if r["label"] == lab] for lab in labels}

    def latency(rs):
        return [r["apply_ms"] + r["ttft_ms"] for r in rs]

    ref_lat = percentile(latency(by.get(REFERENCE, [])), 50)
    # where full itself predicts an empty line, agreeing with it says little: report both
    said = {_point(r) for r in by.get(REFERENCE, []) if normalize(r["pred"])}
    out = {}
    for lab, rs in by.items():
        lat50 = percentile(latency(rs), 50)
        out[lab] = {
            "strategy": rs[0]["strategy"] if rs else lab.split("#")[0],
            "points": len(rs),
            "exact_match": mean(r.get("exact") for r in rs),
            "edit_similarity": mean(r.get("edit_similarity") for r in rs),
            "agreement_with_full": mean(r["agree_full"] for r in rs),
            "agreement_nonempty": mean(r["agree_full"] for r in rs if _point(r) in said),
            "kl_mean": mean(r.get("kl_full") for r in rs),
            "top1_mean": mean(r.get("top1_full") for r in rs),
            "points_nonempty": sum(_point(r) in said for r in rs),
            "apply_ms_p50": percentile([r["apply_ms"] for r in rs], 50),
            "apply_ms_p95": percentile([r["apply_ms"] for r in rs], 95),
            "ttft_ms_p50": percentile([r["ttft_ms"] for r in rs], 50),
            "ttft_ms_p95": percentile([r["ttft_ms"] for r in rs], 95),
            "empty_rate": mean(normalize(r["pred"]) == "" for r in rs),
            "truncated_rate": mean(r["stop"] == "max_new_tokens" for r in rs),
            "line_ms_p50": percentile([r["total_ms"] for r in rs], 50),
            "latency_ms_p50": lat50,
            "latency_ms_p95": percentile(latency(rs), 95),
            "speedup_vs_full": (ref_lat / lat50) if ref_lat and lat50 else None,
            "tokens_encoded_mean": mean(r["tokens_encoded"] for r in rs),
            "keys_rotated_mean": mean(r["keys_rotated"] for r in rs),
            "stale_tokens_mean": mean(r["stale_tokens"] for r in rs),
            "idle_refresh_ms_total": sum(r.get("idle_refresh_ms") or 0.0 for r in records if r["label"] == lab),
        }
    return out


def summarize_scaling(rows: list[dict]) -> list[dict]:
    """Medians per (length, label) of the scaling run (and lazy's deferred compaction)."""
    out = []
    compact = {(r["length"], r["label"]): r for r in rows if r.get("kind") == "compact"}
    rows = [r for r in rows if r.get("kind") != "compact"]
    for n in sorted({r["length"] for r in rows}):
        for lab in dict.fromkeys(r["label"] for r in rows):
            rs = [r for r in rows if r["length"] == n and r["label"] == lab]
            if not rs:
                continue
            c = compact.get((n, lab), {})
            out.append({"length": n, "file_tokens": rs[0]["file_tokens"], "label": lab, "edits": len(rs),
                        "open_ms": rs[0]["open_ms"],
                        "compact_ms": c.get("compact_ms"), "compact_keys": c.get("compact_keys"),
                        "apply_ms_p50": percentile([r["apply_ms"] for r in rs], 50),
                        "rearrange_ms_p50": percentile([r.get("rearrange_ms") for r in rs], 50),
                        "ttft_ms_p50": percentile([r["ttft_ms"] for r in rs], 50),
                        "latency_ms_p50": percentile([r["apply_ms"] + r["ttft_ms"] for r in rs], 50),
                        "tokens_encoded_mean": mean(r["tokens_encoded"] for r in rs)})
    return out


def summarize_curve(rows: list[dict], buckets: int = 4) -> dict:
    """Agreement with full after each edit (mean over the probes), per label; overall and per
    quarter of the edit sequence; stale tokens after each edit; the median edit (apply) time and
    how many times below full's it is, and the median idle refresh time (off the critical path)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    n = max((r["edit"] for r in rows), default=-1) + 1
    per_edit, stale, kl, top1, probes = {}, {}, {}, {}, {}
    for lab in labels:
        rs = [r for r in rows if r["label"] == lab]
        per_edit[lab] = [mean(r["agree_full"] for r in rs if r["edit"] == k) for k in range(n)]
        stale[lab] = [max((r["stale_tokens"] for r in rs if r["edit"] == k), default=0) for k in range(n)]
        kl[lab] = [mean(r.get("kl_full") for r in rs if r["edit"] == k) for k in range(n)]
        top1[lab] = mean(r.get("top1_full") for r in rs)
        probes[lab] = {p: mean(r["agree_full"] for r in rs if r.get("probe") == p)
                       for p in dict.fromkeys(r.get("probe") for r in rs) if p}
    buckets = max(1, min(buckets, n))
    edges = [round(i * n / buckets) for i in range(buckets + 1)]
    by_bucket = {lab: [mean(v[a:b]) for a, b in zip(edges, edges[1:])] for lab, v in per_edit.items()}
    apply = {lab: percentile([r["apply_ms"] for r in rows if r["label"] == lab and r.get("changes")], 50)
             for lab in labels}
    ref = apply.get("full")
    idle = {lab: percentile([r["idle_refresh_ms"] for r in rows if r["label"] == lab and "idle_refresh_ms" in r], 50)
            for lab in labels}
    edits = {lab: [r for r in rows if r["label"] == lab and r.get("changes")] for lab in labels}
    return {"edits": n, "overall": {lab: mean(v) for lab, v in per_edit.items()}, "buckets": edges,
            "recomputed_mean": {lab: mean(r.get("recomputed") for r in rs) for lab, rs in edits.items()},
            "recomputed_share": {lab: mean(r.get("recomputed_share") for r in rs) for lab, rs in edits.items()},
            # encoded for the completions (blend_cursor, a FIM stream's windows), on their critical
            # path: per edit, both probes together
            "recomputed_at_cursor": {lab: sum(r.get("recomputed_at_cursor") or 0 for r in rows if r["label"] == lab)
                                     / max(1, len(rs)) for lab, rs in edits.items()},
            "by_bucket": by_bucket, "per_edit": per_edit, "stale_tokens": stale, "by_probe": probes,
            "kl_mean": {lab: mean(v) for lab, v in kl.items()}, "kl_per_edit": kl, "top1_mean": top1,
            "apply_ms_p50": apply,
            # the completion's own work: what the cursor needed encoded (a FIM stream's windows, blend_cursor)
            "first_token_ms_p50": {lab: percentile([r["ttft_ms"] for r in rows if r["label"] == lab and "ttft_ms" in r],
                                                   50) for lab in labels},
            "apply_below_full": {lab: (ref / a if ref and a else None) for lab, a in apply.items()},
            "idle_refresh_ms_p50": idle}
