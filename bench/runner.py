"""
Driving several strategies through the same edits: one encode forked per strategy, then each step
applied to every fork and, at a prediction point, a completion from each, scored against `full`.
Shared by the replay, the agreement curve and the scaling run.
"""
from __future__ import annotations

import os
import sys
import time

from livekv.bench import metrics


def log(msg: str):
    print(f"[replay] {msg}", file=sys.stderr, flush=True)


def parse_labels(spec: str) -> list[str]:
    """Strategy labels: a strategy name, or name#k for another independent copy of it (`full#2`
    checks that full agrees with itself). ValueError names the bad one."""
    from livekv.incremental import STRATEGIES
    labels = [s.strip() for s in spec.split(",") if s.strip()]
    if not labels:
        raise ValueError("--strategies is empty: name at least one of " + ",".join(STRATEGIES))
    for lab in labels:
        if lab.split("#")[0] not in STRATEGIES:
            raise ValueError(f"unknown strategy {lab!r} in --strategies: choose from {','.join(STRATEGIES)} "
                             "(name#2 runs a second copy)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--strategies names a label twice ({spec}); write full,full#2 for two copies")
    return labels


def to_changes(edits: list[dict]) -> list:
    return [(tuple(e["start"]), tuple(e["end"]), e["text"]) for e in edits]


def n_tokens(engine, text: str) -> int:
    return len(engine.mirror.tokenize(text)[0])


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
    docs = {lab: base.fork(f"{uri}#{lab}", strategy=lab.split("#")[0]) for lab in labels}
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


def run_step(docs: dict, changes: list, predict: dict | None, turn: int, max_new_tokens: int,
             idle_refresh_tokens: int = 0) -> list[dict]:
    """Apply one step's changes to every doc and, at a prediction point, complete the line.
    Returns one record per label (in the labels' order). pie-refresh then re-encodes up to
    idle_refresh_tokens stale tokens, as it would while the user pauses: timed apart, since it
    is off the critical path."""
    labels = list(docs)
    order = labels[turn % len(labels):] + labels[: turn % len(labels)]  # spread warm-up/noise
    recs = {}
    for lab in order:
        d = docs[lab]
        st = d.edit_batch(changes) if changes else d.stats
        rec = {"label": lab, "strategy": d.strategy, "changes": len(changes), "tokens": st["tokens"],
               "apply_ms": st["edit_ms_last"] if changes else 0.0,
               "rearrange_ms": st["rearrange_ms_last"] if changes else 0.0,
               "tokens_encoded": st["tokens_encoded_last_edit"] if changes else 0,
               "keys_rotated": st["keys_rotated_last_edit"] if changes else 0,
               "stale_tokens": st["stale_tokens"], "pred": None}
        if predict is not None:
            pred = d.complete(predict["line"], predict["column"], max_new_tokens=max_new_tokens)
            lc = d.stats["last_completion"]
            # ttft from the decoder, not from the first yielded piece: a first token that is a
            # newline yields no piece at all (see Document.stream)
            rec.update(line=predict["line"], column=predict["column"], truth=predict.get("truth"), pred=pred,
                       ttft_ms=lc["ttft_ms"], total_ms=lc["total_ms"], decode_steps=lc["steps"], stop=lc["stop"])
        if d.strategy == "pie-refresh" and idle_refresh_tokens > 0:
            t0 = time.perf_counter()
            rec["idle_refresh_tokens"] = d.refresh(max_tokens=idle_refresh_tokens)
            rec["idle_refresh_ms"] = (time.perf_counter() - t0) * 1e3
        recs[lab] = rec
    out = [recs[lab] for lab in labels]
    if predict is not None:
        metrics.score_point(out)
    return out
