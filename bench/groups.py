"""Position groups against a sequential layout: the cost of an edit in a context file, and the
quality of completions in the active file.

    livekv bench groups [--active F --context F ...] [--points 12] [--edits 10] [--out DIR]

sequential: one position range, all files concatenated (contexts, then the active file).
groups:     the contexts encoded in parallel from a shared base, the active file after them.
none:       the active file alone (what context is worth at all).
All run on one loaded model in one process. Default files: the stdlib's json package.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from livekv.incremental import Engine
from livekv.incremental.groups import Workspace

from .edit_cost import real_file
from .metrics import edit_similarity, exact_match

HEADER = "# repository context\n"


def default_files() -> tuple[str, list[str]]:
    import json as js
    d = Path(js.__file__).parent
    return str(d / "decoder.py"), [str(d / "scanner.py"), str(d / "encoder.py")]


def points(text: str, k: int) -> list[tuple[int, str]]:
    """k prediction points in the second half: (line, ground truth), cursor at column 0."""
    lines = text.split("\n")
    good = [i for i in range(len(lines) // 2, len(lines) - 1) if len(lines[i].strip()) > 8]
    step = max(1, len(good) // k)
    return [(i, lines[i]) for i in good[::step][:k]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench groups", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--active", default=None)
    p.add_argument("--context", action="append", default=None)
    p.add_argument("--context-tokens", type=int, default=700, help="first lines of each context file up to this")
    p.add_argument("--active-tokens", type=int, default=1200)
    p.add_argument("--points", type=int, default=12)
    p.add_argument("--edits", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/out/groups")
    a = p.parse_args(argv)
    active_path, ctx_paths = default_files() if a.active is None else (a.active, a.context or [])
    eng = Engine.load(model=a.model)
    ctxs = [real_file(c, a.context_tokens, eng.tokenizer)[1] for c in ctx_paths]
    _, active = real_file(active_path, a.active_tokens, eng.tokenizer)
    seq_head = HEADER + "".join(ctxs)
    seq_off = seq_head.count("\n")  # the active file's first line in the sequential document

    ws = Workspace(eng, prefix=HEADER, strategy="pie")
    for path, text in zip(ctx_paths, ctxs):
        ws.set_context(f"file://{path}", text)
    grouped = ws.open(f"file://{active_path}", active)
    seq = eng.open("file:///sequential.py", seq_head + active, strategy="pie")
    alone = eng.open("file:///alone.py", active, strategy="pie")
    print(f"active {active_path}: {grouped.n} tokens; contexts {[d.n for d in ws.contexts.values()]} tokens; "
          f"sequential {seq.n} tokens", file=sys.stderr)

    rows = []
    for line, truth in points(active, a.points):
        row = dict(line=line, truth=truth)
        for name, doc, ln in (("groups", grouped, line), ("sequential", seq, seq_off + line), ("none", alone, line)):
            t0 = time.perf_counter()
            row[name] = doc.complete(ln, 0, max_new_tokens=a.max_new_tokens, multiline=False)
            row[name + "_ms"] = (time.perf_counter() - t0) * 1e3
        rows.append(row)
        print(f"line {line}: {truth.strip()[:40]!r} groups {row['groups'].strip()[:30]!r} "
              f"sequential {row['sequential'].strip()[:30]!r}", file=sys.stderr)

    def quality(name):
        em = statistics.mean(exact_match(r[name], r["truth"]) for r in rows)
        es = statistics.mean(edit_similarity(r[name], r["truth"]) for r in rows)
        agree = statistics.mean(r[name] == r["sequential"] for r in rows)
        return dict(exact_match=em, edit_similarity=es, agreement_with_sequential=agree,
                    completion_ms_p50=statistics.median(r[name + "_ms"] for r in rows))

    # the cost of an edit inside the first context file, under PIE, in both layouts
    costs = {"groups": [], "sequential": []}
    first = next(iter(ws.contexts))
    n_ctx_lines = ctxs[0].count("\n")
    for i in range(a.edits):
        line = (i * 7) % max(1, n_ctx_lines - 1)
        edit = ((line, 0), (line, 0), f"    checked_{i} = True\n")
        st = ws.edit_context(first, [edit])
        costs["groups"].append(dict(ms=st["edit_ms_last"], rotated=st["keys_rotated_last_edit"],
                                    encoded=st["tokens_encoded_last_edit"]))
        seq_edit = ((edit[0][0] + 1, 0), (edit[1][0] + 1, 0), edit[2])  # after the header line
        st = seq.edit(*seq_edit)
        costs["sequential"].append(dict(ms=st["edit_ms_last"], rotated=st["keys_rotated_last_edit"],
                                        encoded=st["tokens_encoded_last_edit"]))
    edit_cost = {k: dict(apply_ms_p50=statistics.median(c["ms"] for c in v),
                         keys_rotated_p50=statistics.median(c["rotated"] for c in v),
                         tokens_encoded_p50=statistics.median(c["encoded"] for c in v)) for k, v in costs.items()}
    result = dict(active=active_path, contexts=ctx_paths, points=len(rows),
                  quality={k: quality(k) for k in ("groups", "sequential", "none")},
                  context_edit_cost=edit_cost, rows=rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "groups.json").write_text(json.dumps(result, indent=1))
    lines = ["| layout | EM | ES | agreement with sequential | completion ms p50 |", "|---|---|---|---|---|"]
    for k, q in result["quality"].items():
        lines.append(f"| {k} | {q['exact_match']:.2f} | {q['edit_similarity']:.2f} | "
                     f"{q['agreement_with_sequential']:.2f} | {q['completion_ms_p50']:.0f} |")
    lines += ["", "| edit in a context file (pie) | apply ms p50 | keys rotated p50 | tokens encoded p50 |",
              "|---|---|---|---|"]
    for k, c in edit_cost.items():
        lines.append(f"| {k} | {c['apply_ms_p50']:.1f} | {c['keys_rotated_p50']:.0f} | {c['tokens_encoded_p50']:.0f} |")
    (out / "groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
