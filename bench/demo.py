"""`livekv demo`: one completion on a real file after an edit in its middle, with the cost of the
edit under PIE next to what a full re-encode costs, on the same loaded model."""
from __future__ import annotations

import sys
import time

from livekv.incremental import Config, Engine

from .edit_cost import real_file


def _row(name: str, doc, edit_ms: float, ttft_ms: float, text: str) -> str:
    s = doc.stats
    return (f"  {name:<5} edit {edit_ms:8.1f} ms  encoded {s['tokens_encoded_last_edit']:5d}  "
            f"rotated {s['keys_rotated_last_edit']:5d}  stale {s['stale_tokens']:5d}  "
            f"first token {ttft_ms:7.1f} ms  -> {text!r}")


def run_demo(config: Config, path: str | None) -> int:
    t0 = time.perf_counter()
    eng = Engine.from_config(config)
    print(f"model {eng.model_name} on {eng.model.device} ({str(eng.model.dtype).removeprefix('torch.')}), "
          f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    path, text = real_file(path, 3000, eng.tokenizer)
    t0 = time.perf_counter()
    pie = eng.open("file:///demo/pie.py", text, strategy="pie")
    print(f"opened {path}: {pie.stats['tokens']} tokens encoded once in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    full = pie.fork("file:///demo/full.py", strategy="full")
    lines = text.splitlines()
    mid = len(lines) // 2
    # a line typed in the middle of the file, then a completion a few lines further down
    indent = lines[mid][: len(lines[mid]) - len(lines[mid].lstrip())]
    edit = ((mid, 0), (mid, 0), f"{indent}# checked: the cache survives this insertion\n")
    line = min(len(lines), mid + 6)
    print(f"\nedit: insert a line at {mid + 1}; complete at line {line + 1} (after "
          f"{lines[line - 1].strip()[:40]!r})\n")
    results = {}
    for name, doc in (("pie", pie), ("full", full)):
        t = time.perf_counter()
        doc.edit(*edit)
        edit_ms = (time.perf_counter() - t) * 1e3
        completion = doc.complete(line, 0)
        results[name] = (edit_ms, doc.stats["last_completion"]["ttft_ms"], completion)
        print(_row(name, doc, *results[name]))
    speed = (results["full"][0] + results["full"][1]) / (results["pie"][0] + results["pie"][1])
    same = results["pie"][2] == results["full"][2]
    than = f"{speed:.1f}x faster than" if speed >= 1 else f"{1 / speed:.1f}x slower than"
    print(f"\npie: edit + first token {than} full re-encode; completions {'agree' if same else 'differ'}.")
    return 0
