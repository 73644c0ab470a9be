"""
Agreement with `full` against the number of edits applied so far (issue 8): how fast do stale
keys (PIE's known cost) make pie drift from the exact cache, and how much do pie-window and
pie-refresh win back?

One real file's release diff is replayed as a stream of line-sized edits: each hunk edit becomes
a deletion of the old lines, then one insertion per new line, as someone typing it would make
them. After every edit each strategy completes at two probes: where typing continues (the line
after the edit) and a fixed late line (90% down the file, below most edits, where staleness
piles up). pie-refresh gets its idle refresh after the probes, as between keystroke bursts.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

from livekv.bench.hunks import offset_to_position, position_to_offset
from livekv.incremental.lines import split_lines
from livekv.bench.runner import check_texts, close_forks, emit, n_tokens, open_forks, run_step

LATE = 0.9


def line_edits(text: str, edits: list[dict]) -> list[dict]:
    """The edits, applied in order to text, split into line-sized sequential edits (same result).
    An edit whose pieces cannot all be named by (line, column) (a lone "\\r" before a "\\n") is
    kept whole."""
    out = []
    for e in edits:
        a, b = position_to_offset(text, *e["start"]), position_to_offset(text, *e["end"])
        pieces, cur, off = [], text, a
        try:
            if b > a:
                pieces.append({"start": list(offset_to_position(cur, a)), "end": list(offset_to_position(cur, b)),
                               "text": ""})
                cur = cur[:a] + cur[b:]
            for ln in split_lines(e["text"]):
                p = list(offset_to_position(cur, off))
                pieces.append({"start": p, "end": p, "text": ln})
                cur = cur[:off] + ln + cur[off:]
                off += len(ln)
            offset_to_position(cur, off)  # the end of the last piece must be nameable too
        except ValueError:
            pieces, cur = [e], text[:a] + e["text"] + text[b:]
        out += pieces
        text = cur
    return out


def pick(engine, traces: list[dict], max_tokens: int, trace_id: str | None) -> tuple[dict, list[list[dict]]]:
    """The trace for the curve and its steps, each a batch of edits: trace_id, or the file with
    the most line edits among those within max_tokens (ties: the shorter file). A release diff's
    edits are split into line edits, one a step; a typing session's steps are its batches."""
    def edits_of(tr):
        if tr.get("session"):
            return [s["edits"] for s in tr["steps"]]
        return [[e] for e in line_edits(tr["old_text"], [e for s in tr["steps"] for e in s["edits"]])]

    if trace_id is not None:
        tr = next((t for t in traces if t["id"] == trace_id), None)
        if tr is None:
            raise ValueError(f"--curve-trace {trace_id!r} is not in the trace files; ids look like "
                             f"{traces[0]['id'] if traces else 'flask==3.0.3:3.1.0:flask/app.py'}")
        return tr, edits_of(tr)
    best = None
    for tr in traces:
        n = max(n_tokens(engine, tr["old_text"]), n_tokens(engine, tr["new_text"]))
        if n > max_tokens:
            continue
        eds = edits_of(tr)
        if best is None or (len(eds), -n) > (len(best[1]), -best[2]):
            best = (tr, eds, n)
    if best is None or not best[1]:
        raise ValueError(f"no trace within {max_tokens} tokens has edits; raise --max-file-tokens or give other traces")
    return best[0], best[1]


def probe_at(text: str, offset: int) -> dict:
    """Column 0 of the line at offset (of the next line when offset is mid-line), clamped to the text."""
    line, col = offset_to_position(text, offset)
    n_lines = len(split_lines(text)) + (text == "" or text.endswith(("\n", "\r")))
    return {"line": min(line + (col > 0), n_lines - 1), "column": 0, "truth": None}


def run(engine, traces: list[dict], labels: list[str], n_edits: int = 100, max_new_tokens: int = 24,
        max_file_tokens: int = 4096, idle_refresh_tokens: int = 1024, trace_id: str | None = None,
        load=None, progress: bool = True, sink=None) -> dict:
    """Replay up to n_edits line edits of one file; sink(record) gets one record per edit, probe
    and strategy. Returns what was run (trace, edits, tokens)."""
    if "full" not in labels:
        raise ValueError("the agreement curve compares with full: put full in --curve-strategies")
    tr, edits = pick(engine, traces, max_file_tokens, trace_id)
    edits = edits[:n_edits]  # steps
    info = {"trace": tr["id"], "edits": len(edits), "file_tokens": n_tokens(engine, tr["old_text"])}
    print(f"[curve] {tr['id']}: {len(edits)} line edits, {info['file_tokens']} tokens, {len(labels)} strategies",
          file=sys.stderr, flush=True)
    docs = open_forks(engine, f"curve:///{tr['id']}", tr["old_text"], labels)
    text = tr["old_text"]
    bar = tqdm(total=len(edits), desc="curve", unit="edit", file=sys.stderr, disable=not progress)
    try:
        for k, step in enumerate(edits):
            for e in step:
                a = position_to_offset(text, *e["start"])
                text = text[:a] + e["text"] + text[position_to_offset(text, *e["end"]):]
            site = probe_at(text, a + len(step[-1]["text"]))
            late = {"line": int(LATE * len(split_lines(text))), "column": 0, "truth": None}
            ch = [(tuple(e["start"]), tuple(e["end"]), e["text"]) for e in step]
            for probe, changes, pt, idle in (("edit", ch, site, 0), ("late", [], late, idle_refresh_tokens)):
                emit(run_step(docs, changes, pt, k, max_new_tokens, idle), sink, trace=tr["id"], edit=k, probe=probe)
            emit([], load=load, bar=bar)
        check_texts(docs, text, tr["id"])
    finally:
        close_forks(engine, docs)
        bar.close()
    return info
