"""Edit cost: single-line edits on a real ~3,000-token file under `full` and under `pie`.

For each edit it measures the edit plus the first completion token at the line after it, for
both strategies in the same run (interleaved, so machine noise hits both alike), and prints
the ratio full / pie.

    livekv bench edit-cost [--file F] [--tokens 3000] [--edits 20]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from livekv.incremental import Engine


def real_file(path: str | None, tokens: int, tokenizer) -> tuple[str, str]:
    """The first lines of a real source file that hold about `tokens` tokens."""
    if path is None:
        import difflib
        path = difflib.__file__
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    lo, hi = 1, len(lines)
    while lo < hi:  # the fewest lines that reach the token count
        mid = (lo + hi) // 2
        if len(tokenizer("".join(lines[:mid]), add_special_tokens=False).input_ids) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return path, "".join(lines[:lo])


def single_line_edits(text: str, n: int, seed: int) -> list[tuple]:
    """n edits as a person makes them: insert, delete or rewrite one line in the middle half."""
    rng = random.Random(seed)
    n_lines = text.count("\n")
    edits = []
    for i in range(n):
        line = rng.randrange(n_lines // 4, 3 * n_lines // 4)
        kind = ("insert", "delete", "replace")[i % 3]
        if kind == "insert":
            edits.append(((line, 0), (line, 0), "        result = self._check(value, strict=True)\n"))
        elif kind == "delete":
            edits.append(((line, 0), (line + 1, 0), ""))
        else:
            edits.append(((line, 0), (line + 1, 0), "        return None\n"))
    return edits


def edit_then_first_token(doc, edit) -> tuple[float, dict]:
    t0 = time.perf_counter()
    doc.edit(*edit)
    stats = dict(doc.stats)
    line = edit[0][0] + (0 if edit[2] == "" else 1)  # the line after the edit
    doc.complete(line, 0, max_new_tokens=1)
    return (time.perf_counter() - t0) * 1e3, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench edit-cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default=None, help="a source file (default: the stdlib's difflib.py)")
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="also write the per-edit figures here")
    a = p.parse_args(argv)
    eng = Engine.load(model=a.model)
    path, text = real_file(a.file, a.tokens, eng.tokenizer)
    pie = eng.open("file:///pie.py", text, strategy="pie")
    full = pie.fork("file:///full.py", strategy="full")
    print(f"{path}: {pie.stats['tokens']} tokens, {text.count(chr(10))} lines; model {eng.model_name}; "
          f"{a.edits} single-line edits, each timed as edit + first completion token", file=sys.stderr)
    rows = []
    for i, e in enumerate(single_line_edits(text, a.edits, a.seed)):
        order = (full, pie) if i % 2 == 0 else (pie, full)  # alternate who goes first
        ms = {}
        for d in order:
            ms[d.strategy] = edit_then_first_token(d, e)
        assert pie.text == full.text
        rows.append(dict(edit=i, full_ms=ms["full"][0], pie_ms=ms["pie"][0],
                         full_encoded=ms["full"][1]["tokens_encoded_last_edit"],
                         pie_encoded=ms["pie"][1]["tokens_encoded_last_edit"],
                         pie_rotated=ms["pie"][1]["keys_rotated_last_edit"]))
        r = rows[-1]
        print(f"edit {i:2d}: full {r['full_ms']:8.1f} ms ({r['full_encoded']} encoded)   "
              f"pie {r['pie_ms']:7.1f} ms ({r['pie_encoded']} encoded, {r['pie_rotated']} rotated)", file=sys.stderr)
    f50 = statistics.median(r["full_ms"] for r in rows)
    p50 = statistics.median(r["pie_ms"] for r in rows)
    ratio = f50 / p50
    print(f"median edit + first token: full {f50:.1f} ms, pie {p50:.1f} ms; full / pie = {ratio:.1f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(file=path, tokens=pie.stats["tokens"], rows=rows,
                                                full_ms_p50=f50, pie_ms_p50=p50, ratio=ratio), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
