"""
The scaling run: apply time and time to first token against file length, per strategy.

A file of each length is real code: stdlib modules concatenated in a fixed order and cut at a
line boundary just under the length. It is encoded once and forked per strategy; then a few
edits, spread over the middle of the file, each insert a copy of a line (a real line of code)
and ask for the completion right below it. The edits sit mid-file on purpose: prefix and reuse
re-encode everything after an edit, so an edit near the end would flatter them and one near the
top would flatter nothing.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from livekv.bench.hunks import is_substantive
from livekv.incremental.lines import split_lines
from livekv.bench.runner import close_forks, emit, n_tokens, open_forks, run_step

# large, plain-Python stdlib modules; the order fixes the text of every length
MODULES = ("difflib", "argparse", "inspect", "typing", "dataclasses", "pathlib", "subprocess", "tarfile",
           "pydoc", "mailbox", "configparser", "logging.__init__", "email._header_value_parser", "turtle")


def corpus(engine, n: int) -> str:
    """About n tokens (at most n) of real code, cut at a line end."""
    parts, chars = [], 0
    for name in MODULES:
        mod = importlib.import_module(name.removesuffix(".__init__"))
        src = Path(mod.__file__).read_text(encoding="utf-8")
        parts.append(f"# ---- {name.replace('.', '/')}.py\n{src}\n")
        chars += len(parts[-1])
        if chars > 6 * n:  # code runs ~3-4 characters a token: this is enough
            break
    text = "".join(parts)
    ids, starts, _ = engine.mirror.tokenize(text)
    if len(ids) <= n:
        raise ValueError(f"the stdlib corpus has only {len(ids)} tokens; ask for lengths up to that")
    cut = text.rfind("\n", 0, int(starts[n])) + 1
    return text[:cut]


def edit_lines(text: str, k: int) -> list[int]:
    """k substantive lines spread over the middle of the file (at fractions 1/(k+1) .. k/(k+1))."""
    lines = split_lines(text)
    out = []
    for i in range(k):
        t = max(1, int(len(lines) * (i + 1) / (k + 1)))
        while t < len(lines) - 2 and not is_substantive(lines[t]):
            t += 1
        out.append(t)
    return out


def run(engine, lengths: list[int], labels: list[str], edits: int = 2, max_new_tokens: int = 24,
        load=None, progress: bool = True, sink=None) -> list[dict]:
    """Rows {length, file_tokens, label, strategy, edit, apply_ms, ttft_ms, total_ms, ...}: one per
    length, edit and strategy; then for `lazy`, one {kind: "compact", compact_ms, compact_keys}
    per length: the compaction its edits deferred. sink(row) streams them."""
    rows, turn = [], 0
    bar = tqdm(total=len(lengths) * edits, desc="scaling", unit="edit", file=sys.stderr, disable=not progress)
    for n in lengths:
        text = corpus(engine, n)
        bar.set_postfix_str(f"{n} tokens: encoding once")
        t0 = time.perf_counter()
        docs = open_forks(engine, f"scaling:///{n}", text, labels)
        open_ms = (time.perf_counter() - t0) * 1e3
        tokens = n_tokens(engine, text)
        bar.set_postfix_str(f"{n} tokens")
        try:
            shift = 0
            for e, t in enumerate(edit_lines(text, edits)):
                line = split_lines(text)[t]
                t += shift  # earlier edits inserted lines above
                recs = run_step(docs, [((t, 0), (t, 0), line)], {"line": t + 1, "column": 0, "truth": None},
                                turn, max_new_tokens)
                shift += 1
                turn += 1
                emit(recs, sink, load, bar, length=n, file_tokens=tokens, edit=e, open_ms=open_ms)
                rows += recs
            for lab, d in docs.items():
                if d.strategy == "lazy":  # what lazy defers: paid once per lazy_segments edits or so
                    t0 = time.perf_counter()
                    keys = d.compact()
                    r = dict(kind="compact", length=n, file_tokens=tokens, label=lab, strategy=d.strategy,
                             compact_ms=(time.perf_counter() - t0) * 1e3, compact_keys=keys)
                    rows.append(r)
                    emit([r], sink)
        finally:
            close_forks(engine, docs)
    bar.close()
    return rows
