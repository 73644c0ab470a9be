"""`livekv bench gpu`, part edit: edit + first token, `full` (re-encode) against `pie`.

The scaling run's file of each length (stdlib modules end to end) is encoded once and forked per
strategy; then single-line edits in its middle half (insert, delete, rewrite), each timed as
doc.edit plus a one-token completion at the line below it (edit_cost.edit_then_first_token: the
completion's answer is read on the host, so the GPU's work is in the time). The first edit of
each length warms up and is not counted; the two strategies alternate who goes first.
"""
from __future__ import annotations

import statistics
import sys

from livekv.bench.edit_cost import edit_then_first_token, single_line_edits
from livekv.bench.runner import close_forks, n_tokens, open_forks
from livekv.bench.scaling import corpus

LENGTHS = (2048, 8192, 16384)
DRY_LENGTHS = (128, 256)
STRATEGIES = ("full", "pie")


def lengths(bench) -> list[int]:
    if bench.args.lengths is None:
        return list(DRY_LENGTHS if bench.dry else LENGTHS)
    try:
        out = [int(s) for s in bench.args.lengths.split(",") if s]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated token counts, got {bench.args.lengths!r}") from None
    if not out or min(out) < 16:
        raise ValueError(f"--lengths must be token counts of at least 16, got {bench.args.lengths!r}")
    return out


def run(bench, rows: list, notes: list) -> None:
    eng = bench.engine()
    notes.append(f"model: {eng.model_name}, {eng.model.n_layers} layers, {eng.model.dtype} on {eng.model.device}; "
                 f"{bench.args.edits} timed edits per length after one warm-up; ms = edit + first token, p50")
    for n in lengths(bench):
        print(f"  edit: {n} tokens", file=sys.stderr, flush=True)
        text = corpus(eng, n)
        docs = open_forks(eng, f"file:///gpu/{n}.py", text, list(STRATEGIES))
        try:
            ms = {s: [] for s in STRATEGIES}
            encoded = {s: [] for s in STRATEGIES}
            rotated = []
            for i, e in enumerate(single_line_edits(text, bench.args.edits + 1, seed=n)):
                order = STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]
                for s in order:
                    t, stats = edit_then_first_token(docs[s], e)
                    if i > 0:
                        ms[s].append(t)
                        encoded[s].append(stats["tokens_encoded_last_edit"])
                        rotated += [stats["keys_rotated_last_edit"]] if s == "pie" else []
            assert docs["full"].text == docs["pie"].text
            full, pie = statistics.median(ms["full"]), statistics.median(ms["pie"])
            rows.append(dict(file_tokens=n_tokens(eng, text), full_ms_p50=full, pie_ms_p50=pie, full_over_pie=full / pie,
                             full_encoded=statistics.median(encoded["full"]), pie_encoded=statistics.median(encoded["pie"]),
                             pie_rotated=statistics.median(rotated), edits=len(ms["pie"])))
        finally:
            close_forks(eng, docs)
