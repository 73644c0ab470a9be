"""
The replay's PNG plots (matplotlib, Agg: no display needed), drawn from a run folder.

- latency_vs_length.png  scaling run: median apply and time to first token against file length
- latency_cdf.png        replay: distribution (CDF) of apply + time to first token per strategy
- quality.png            replay: exact match, edit similarity, agreement with full per strategy
- agreement_curve.png    agreement with full against edits applied so far, and stale tokens
- budget_sweep.png       curve run with pie-blend at several budgets: agreement and KL against
                         tokens recomputed per edit, one line per selection rule
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from livekv.bench.report import read_jsonl  # noqa: E402

STYLE = {"full": ("black", "-"), "prefix": ("tab:blue", "-"), "reuse": ("tab:cyan", "-"),
         "conflict": ("tab:red", ":"), "pie": ("tab:green", "-"), "pie-window": ("tab:olive", "--"),
         "pie-refresh": ("tab:purple", "-."), "lazy": ("tab:orange", (0, (2, 2)))}


def style(label: str) -> dict:
    color, ls = STYLE.get(label.split("#")[0], ("gray", "-"))
    return {"color": color, "linestyle": ls if "#" not in label else (0, (1, 3))}


def latency_vs_length(summary: list[dict], path: Path) -> None:
    panels = [("rearrange_ms_p50", "update the cache: move and rotate keys\n(lazy: record deltas), median ms"),
              ("apply_ms_p50", "apply an edit: the above + encode\nthe new tokens, median ms"),
              ("ttft_ms_p50", "time to first token (median ms)")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), sharex=True)
    for lab in dict.fromkeys(r["label"] for r in summary):
        rs = sorted((r for r in summary if r["label"] == lab), key=lambda r: r["file_tokens"])
        x = [r["file_tokens"] for r in rs]
        for ax, (key, _) in zip(axes, panels):
            # full re-encodes: it has no cache to update, only everything to encode again
            if any(r.get(key) is not None for r in rs) and not (key == "rearrange_ms_p50" and lab == "full"):
                ax.plot(x, [r.get(key) for r in rs], marker="o", label=lab, **style(lab))
        if any(r.get("compact_ms") for r in rs):  # lazy: the rotation it defers, paid at compaction
            cs = [r for r in rs if r.get("compact_ms")]
            axes[0].plot([r["file_tokens"] for r in cs], [r["compact_ms"] for r in cs], marker="x",
                         label=f"{lab}: one compaction", color=style(lab)["color"], linestyle=":")
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("file length (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf(records: list[dict], labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lab in labels:
        lat = np.sort([r["apply_ms"] + r["ttft_ms"] for r in records if r["label"] == lab and r.get("pred") is not None])
        if len(lat):
            ax.step(np.maximum(lat, 1e-1), np.arange(1, len(lat) + 1) / len(lat), where="post", label=lab, **style(lab))
    ax.set_xscale("log")
    ax.set_xlabel("apply + time to first token (ms)")
    ax.set_ylabel("fraction of prediction points")
    ax.set_title("latency after an edit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality(strategies: dict, path: Path) -> None:
    labels = list(strategies)
    keys = [("exact_match", "exact match"), ("edit_similarity", "edit similarity"),
            ("agreement_with_full", "agreement with full")]
    x, w = np.arange(len(labels)), 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4.2))
    for i, (k, name) in enumerate(keys):
        vals = [strategies[lab][k] if strategies[lab][k] is not None else np.nan for lab in labels]
        bars = ax.bar(x + (i - 1) * w, vals, w, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylim(0, 1.2)
    ax.set_title("completion quality per strategy")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement_curve(c: dict, path: Path, window: int = 10) -> None:
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    for lab, v in c["per_edit"].items():
        v = np.array([np.nan if x is None else x for x in v], dtype=float)
        k = min(window, len(v))
        # trailing mean: the value at edit i summarizes edits i-k+1..i, so drift shows where it starts
        smooth = np.array([np.nanmean(v[max(0, i - k + 1): i + 1]) for i in range(len(v))])
        a1.plot(np.arange(1, len(v) + 1), smooth, label=lab, **style(lab))
        a2.plot(np.arange(1, len(v) + 1), c["stale_tokens"][lab], label=lab, **style(lab))
    a1.set_ylabel(f"agreement with full\n(trailing mean of {window} edits)")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title(f"{c.get('trace') or ''}: {c['edits']} sequential line edits")
    a1.legend(fontsize=8)
    a2.set_ylabel("stale tokens")
    a2.set_xlabel("edits applied so far")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_points(c: dict) -> dict[str, list[tuple]]:
    """{rule: [(recomputed per edit, agreement, KL, label)...]} by budget, for the curve's pie-blend
    labels (at the cursor too, with blend_cursor) and pie-window; pie joins every rule at budget 0.
    Rules with one budget are points."""
    from livekv.bench.runner import label_settings
    from livekv.incremental import Config
    out: dict[str, list[tuple]] = {}
    for lab in c["overall"]:
        strategy, overrides, _ = label_settings(lab.split("#")[0])
        if strategy in ("pie-blend", "pie-window"):  # pie-window is the window rule at refresh_window
            rule = "window" if strategy == "pie-window" else overrides.get("blend_rule", Config().blend_rule)
            rule += "+cursor" * bool(overrides.get("blend_cursor", Config().blend_cursor))
            layers = overrides.get("blend_layers", Config().blend_layers)
            rule += f" (narrowed over {layers} layers)" * (rule.startswith("deviation") and layers > 1)
            cost = c["recomputed_mean"][lab] + c.get("recomputed_at_cursor", {}).get(lab, 0)
            out.setdefault(rule, []).append((cost, c["overall"][lab], c["kl_mean"][lab], lab))
    if "pie" in c["overall"]:
        for pts in out.values():
            pts.append((0.0, c["overall"]["pie"], c["kl_mean"]["pie"], "pie"))
    return {rule: sorted(pts) for rule, pts in out.items()}


def budget_sweep(c: dict, path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for rule, pts in sweep_points(c).items():
        x, agree, kl = (np.array([p[i] for p in pts], dtype=float) for i in range(3))
        kw = dict(marker="o", label=rule, linestyle="--" if rule == "window" else "-")
        a1.plot(x, agree, **kw)
        a2.plot(x, kl, **kw)
    a1.set_ylabel("agreement with full (both probes)")
    a2.set_ylabel("KL from full (next token)")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.set_xlabel("stale tokens recomputed per edit (mean)")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"pie-blend budget sweep: {c.get('trace') or ''}, {c['edits']} edits", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(out: Path, res: dict) -> list[Path]:
    """Every plot the run folder has data for; returns the files written."""
    out, made = Path(out), []
    if res.get("strategies"):
        records = read_jsonl(out / "records.jsonl")
        latency_cdf(records, list(res["strategies"]), out / "latency_cdf.png")
        quality(res["strategies"], out / "quality.png")
        made += [out / "latency_cdf.png", out / "quality.png"]
    if res.get("scaling"):
        latency_vs_length(res["scaling"], out / "latency_vs_length.png")
        made.append(out / "latency_vs_length.png")
    if res.get("agreement_curve"):
        agreement_curve(res["agreement_curve"], out / "agreement_curve.png")
        made.append(out / "agreement_curve.png")
        c = res["agreement_curve"]
        if "recomputed_mean" in c and sum(len(p) > 2 for p in sweep_points(c).values()):
            budget_sweep(c, out / "budget_sweep.png")
            made.append(out / "budget_sweep.png")
    return made
