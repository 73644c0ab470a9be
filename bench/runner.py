"""
Driving several strategies through the same edits: one encode forked per strategy, then each step
applied to every fork and, at a prediction point, a completion from each, scored against `full`.
Shared by the replay, the agreement curve and the scaling run.
"""
from __future__ import annotations

import os
import re
import sys
import time

from livekv.bench import metrics


def log(msg: str):
    print(f"[replay] {msg}", file=sys.stderr, flush=True)


LABEL = re.compile(r"([a-z-]+)(?:\[([^\]]*)\])?(#\d+)?")


def parse_labels(spec: str) -> list[str]:
    """Strategy labels: a strategy name, name#k for another independent copy of it (`full#2`
    checks that full agrees with itself), or name[setting=value,...] with the document's own
    Config settings, and `idle` (pie-refresh's idle tokens): pie-blend[blend_cap=32,blend_rule=age],
    pie-refresh[idle=0]. ValueError names the bad one."""
    from livekv.incremental import STRATEGIES
    labels = [s.strip() for s in re.split(r",(?![^\[]*\])", spec) if s.strip()]
    if not labels:
        raise ValueError("--strategies is empty: name at least one of " + ",".join(STRATEGIES))
    for lab in labels:
        m = LABEL.fullmatch(lab)
        if not m or m[1] not in STRATEGIES:
            raise ValueError(f"unknown strategy {lab!r} in --strategies: choose from {','.join(STRATEGIES)} "
                             "(name#2 runs a second copy, name[setting=value] sets its own settings)")
        label_settings(lab)  # ValueError for a bad setting
    if len(set(labels)) != len(labels):
        raise ValueError(f"--strategies names a label twice ({spec}); write full,full#2 for two copies")
    return labels


def label_settings(lab: str) -> tuple[str, dict, dict]:
    """(strategy, its Config overrides, bench options such as idle) of a label."""
    from livekv.incremental import Config
    m = LABEL.fullmatch(lab)
    given = dict(kv.split("=", 1) for kv in (m[2] or "").split(",") if kv)
    bench = {k: int(given.pop(k)) for k in ("idle",) if k in given}
    fields = {f["name"]: f for f in Config.schema()}
    unknown = set(given) - set(fields)
    if unknown:
        raise ValueError(f"label {lab!r}: unknown setting(s) {sorted(unknown)}")
    conv = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes"), "str": str}
    overrides = {k: conv[fields[k]["type"]](v) for k, v in given.items()}
    Config().updated(**overrides)  # ValueError: refused
    return m[1], overrides, bench


def to_changes(edits: list[dict]) -> list:
    return [(tuple(e["start"]), tuple(e["end"]), e["text"]) for e in edits]


def n_tokens(engine, text: str) -> int:
    return len(engine.mirror.tokenize(text)[0])


def cell(x, kind: str = "ms") -> str:
    """One figure of a results table: – where there is none."""
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return {"frac": f"{x:.3f}", "ms": f"{x:,.0f}", "ms1": f"{x:.1f}", "x": f"{x:.2f}×", "n": f"{x:,.0f}",
            "kl": f"{x:.4f}"}[kind]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


class LoadMeter:
    """The 1-minute load average over a run: other workers share these cores, and the numbers
    mean little without it."""

    def __init__(self):
        self.samples = []
        self.sample()

    def sample(self):
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples
        return {"start": s[0], "end": s[-1], "mean": sum(s) / len(s), "max": max(s), "cpus": os.cpu_count()}


# ---------------------------------------------------------------- one step, every strategy

def open_forks(engine, uri: str, text: str, labels: list[str]) -> dict:
    """Encode text once and fork it per label: every strategy starts from the same cache."""
    base = engine.open(f"{uri}#base", text, strategy="full")
    docs = {}
    for lab in labels:
        strategy, overrides, _ = label_settings(lab)
        docs[lab] = base.fork(f"{uri}#{lab}", strategy=strategy)
        docs[lab].configure(**overrides)
    engine.close(base.uri)
    return docs


def close_forks(engine, docs: dict):
    for d in docs.values():
        engine.close(d.uri)


def emit(recs: list[dict], sink=None, load=None, bar=None, **fields) -> None:
    """Label one step's records with fields, stream them to sink, and tick the meters."""
    for r in recs:
        r.update(fields)
    if sink:
        sink(recs)
    if load:
        load.sample()
    if bar is not None:
        bar.update(1)


def check_texts(docs: dict, text: str, what: str) -> None:
    """Every strategy's document must hold the text the edits make: anything else is a bug."""
    if any(d.text != text for d in docs.values()):
        raise RuntimeError(f"bug: after replaying {what} a document differs from the replayed text")


FORCED = 8  # tokens of full's completion every strategy is teacher-forced on


def run_step(docs: dict, changes: list, predict: dict | None, turn: int, max_new_tokens: int,
             idle_refresh_tokens: int = 0) -> list[dict]:
    """Apply one step's changes to every doc and, at a prediction point, complete the line and
    score each cache against full's (fidelity). Returns one record per label (in the labels'
    order). pie-refresh then re-encodes up to idle_refresh_tokens stale tokens, as it would while
    the user pauses: timed apart, since it is off the critical path."""
    labels = list(docs)
    order = labels[turn % len(labels):] + labels[: turn % len(labels)]  # spread warm-up/noise
    recs, ids = {}, {}
    for lab in order:
        d = docs[lab]
        st = d.edit_batch(changes) if changes else d.stats
        rec = {"label": lab, "strategy": d.strategy, "changes": len(changes), "tokens": st["tokens"],
               "apply_ms": st["edit_ms_last"] if changes else 0.0,
               "rearrange_ms": st["rearrange_ms_last"] if changes else 0.0,
               "tokens_encoded": st["tokens_encoded_last_edit"] if changes else 0,
               # stale tokens encoded again: by the plan (pie-window), the blend, or all of them (full)
               "recomputed": st["tokens_encoded_last_edit"] - st["tokens_new_last_edit"] if changes else 0,
               "recomputed_share": st["repaired_share_last_edit"] if changes and d.strategy == "pie-blend" else None,
               "keys_rotated": st["keys_rotated_last_edit"] if changes else 0,
               "stale_tokens": st["stale_tokens"], "pred": None}
        if predict is not None:
            before = d.stats["tokens_encoded_total"]
            comp = d.suggest(predict["line"], predict["column"], max_new_tokens=max_new_tokens)
            lc, ids[lab] = d.stats["last_completion"], comp.ids
            # what the cursor had encoded again: blend_cursor's, a FIM stream's windows (full: all a move left stale)
            rec["recomputed_at_cursor"] = d.stats["tokens_encoded_total"] - before
            # ttft from the decoder, not from the first yielded piece: a first token that is a
            # newline yields no piece at all (see Document.stream)
            rec.update(line=predict["line"], column=predict["column"], truth=predict.get("truth"), pred=comp.text,
                       ttft_ms=lc["ttft_ms"], total_ms=lc["total_ms"], decode_steps=lc["steps"], stop=lc["stop"])
        recs[lab] = rec
    if predict is not None and metrics.REFERENCE in docs:
        fidelity(docs, recs, ids[metrics.REFERENCE][:FORCED], predict)
    for lab in order:
        d, rec = docs[lab], recs[lab]
        idle = label_settings(lab)[2].get("idle", idle_refresh_tokens)
        if d.strategy == "pie-refresh" and idle > 0:
            t0 = time.perf_counter()  # as the LSP idle job: the ranked tokens, then the stalest region
            n = d.refresh(max_tokens=idle, ranked=True)
            rec["idle_refresh_tokens"] = n + (d.refresh(max_tokens=idle - n) if n < idle else 0)
            rec["idle_refresh_ms"] = (time.perf_counter() - t0) * 1e3
    out = [recs[lab] for lab in labels]
    if predict is not None:
        metrics.score_point(out)
    return out


def fidelity(docs: dict, recs: dict, forced: list[int], predict: dict) -> None:
    """Each record gets kl_full, the KL divergence of its next-token distribution from full's,
    and top1_full, the share of full's first tokens it would pick itself, teacher-forced on
    them (None without any)."""
    ref = docs[metrics.REFERENCE].teacher_forced(predict["line"], predict["column"], forced)
    for lab, d in docs.items():
        lp = ref if lab == metrics.REFERENCE else d.teacher_forced(predict["line"], predict["column"], forced)
        recs[lab]["kl_full"], recs[lab]["top1_full"] = metrics.divergence(ref, lp, forced)
