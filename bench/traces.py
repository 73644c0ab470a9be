"""
Build edit-replay traces (JSONL, format in docs/traces.md) for the benchmark.

    livekv bench traces flask==3.0.3:3.1.0 packaging==24.1:24.2 --out traces.jsonl
    livekv bench traces --synthetic /usr/lib/python3.11/difflib.py --per-file 5 --out syn.jsonl

Release mode replays the real diff between two releases of a package, one
prediction point per hunk; synthetic mode follows PIE (single-line insertion,
single-line deletion, multi-place edits above the line to predict).
"""

import argparse
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

from livekv.bench.hunks import apply_edits, diff_steps, is_substantive, offset_to_position, split_lines, strip_eol
from livekv.bench.releases import ReleaseError, fetch, read_py_files

KINDS = ("insert", "delete", "multi")
MULTI_PLACES = 3


def log(msg: str):
    print(f"[traces] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- release mode

def file_trace(old_text: str, new_text: str, path: str, package=None, old_version=None, new_version=None) -> dict:
    """The trace that replays the diff old_text -> new_text of one file, hunk by hunk."""
    steps, counts = diff_steps(old_text, new_text)
    return {"id": f"{package}=={old_version}:{new_version}:{path}", "source": "release",
            "package": package, "old_version": old_version, "new_version": new_version,
            "path": path, "kind": "hunk", "old_text": old_text, "new_text": new_text,
            "steps": steps, "counts": counts}


def release_traces(package: str, old: str, new: str, wheel_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Traces of every .py file that changed between package==old and package==new, and counts."""
    (a, bad_a), (b, bad_b) = (read_py_files(fetch(package, v, wheel_dir), v) for v in (old, new))
    c = collections.Counter(files_added=len(b.keys() - a.keys()), files_removed=len(a.keys() - b.keys()),
                            files_undecodable=bad_a + bad_b)
    traces = []
    for path in sorted(a.keys() & b.keys()):
        if a[path] == b[path]:
            c["files_unchanged"] += 1
            continue
        try:
            tr = file_trace(a[path], b[path], path, package, old, new)
        except RuntimeError as e:  # a bug, not bad input: say which file triggers it
            raise RuntimeError(f"{package} {old} -> {new}, {path}: {e}") from e
        c["files_changed"] += 1
        c.update(tr["counts"])
        traces.append(tr)
    return traces, dict(c)


_SPEC = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^:\s]+):([^:\s]+)")


def parse_spec(spec: str) -> tuple[str, str, str]:
    m = _SPEC.fullmatch(spec.strip())
    if not m:
        raise ReleaseError(f"cannot read {spec!r}: write PACKAGE==OLD:NEW, e.g. flask==3.0.3:3.1.0")
    if m[2] == m[3]:
        raise ReleaseError(f"{spec!r} names the same version twice: give an older and a newer release")
    return m[1], m[2], m[3]


# ---------------------------------------------------------------- synthetic mode (PIE)

def synthetic_traces(text: str, path: str, kind: str, n: int, rng: random.Random) -> list[dict]:
    """Up to n traces of one kind on one file: the document is the file minus a target
    line t (second half, substantive); the step inserts/deletes lines above t so the
    document becomes file-minus-t; the model then predicts line t at its place."""
    lines = split_lines(text)
    eol = collections.Counter(ln[len(strip_eol(ln)):] for ln in lines if ln != strip_eol(ln))
    eol = eol.most_common(1)[0][0] if eol else "\n"
    # a target repeated on the next line would sit in plain sight right after the cursor
    targets = [t for t in range(len(lines) // 2, len(lines)) if is_substantive(lines[t])
               and (t + 1 == len(lines) or lines[t + 1].strip() != lines[t].strip())]
    nonblank = [r for r in range(len(lines)) if lines[r].strip()]
    need = MULTI_PLACES if kind == "multi" else 1
    out = []
    for t in sorted(rng.sample(targets, min(n, len(targets)))):
        doc = lines[:t] + lines[t + 1:]  # what the document is once the step is applied
        above = [r for r in nonblank if r < t]
        if len(above) < need:
            continue
        places = sorted(rng.sample(above, need))
        ops = {r: (kind if kind != "multi" else rng.choice(("insert", "delete"))) for r in places}
        start, edits = [], []
        for k, line in enumerate(doc):
            op = ops.get(k)
            if op == "delete":
                extra = lines[rng.choice([j for j in nonblank if j not in (k, t)] or [k])]
                start.append(extra if extra != strip_eol(extra) else extra + eol)
                edits.append({"start": [k, 0], "end": [k + 1, 0], "text": ""})
            if op == "insert":
                edits.append({"start": [k, 0], "end": [k, 0], "text": line})
            else:
                start.append(line)
        old_text, new_text = "".join(start), "".join(doc)
        try:  # a lone "\r" line ending can make a line boundary unnameable; skip such samples
            ok = apply_edits(old_text, edits) == new_text
            ok = ok and offset_to_position(new_text, len("".join(doc[:t]))) == (t, 0)
        except ValueError:
            ok = False
        if not ok:
            continue
        out.append({"id": f"synthetic:{kind}:{path}:{t}", "source": "synthetic", "package": None,
                    "old_version": None, "new_version": None, "path": path, "kind": kind,
                    "old_text": old_text, "new_text": new_text, "target_line": t, "places": places,
                    "steps": [{"hunk": None, "edits": edits, "format_only": False,
                               "predict": {"line": t, "column": 0, "truth": strip_eol(lines[t])}}]})
    return out


def _py_files(arg: str):
    """(path to read, name that seeds the sampling) for a file, or every .py under a folder;
    the name is relative so the samples do not depend on where the stdlib lives."""
    p = Path(arg)
    if p.is_dir():
        for f in sorted(p.rglob("*.py")):
            yield f, f.relative_to(p).as_posix()
    elif p.is_file():
        yield p, p.name
    else:
        raise ReleaseError(f"--synthetic {arg}: no such file or folder; give .py files or folders of them")


def synthetic_all(args_paths, kinds, per_file, seed) -> tuple[list[dict], dict]:
    traces, c = [], collections.Counter()
    for arg in args_paths:
        for f, name in _py_files(arg):
            try:
                text = f.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                c["files_unreadable"] += 1
                continue
            c["files"] += 1
            for kind in kinds:
                got = synthetic_traces(text, str(f), kind, per_file, random.Random(f"{seed}:{name}:{kind}"))
                c[kind] += len(got)
                traces += got
    return traces, dict(c)


# ---------------------------------------------------------------- I/O and CLI

def load_traces(path) -> list[dict]:
    """Every trace in a JSONL file written by this module."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_traces(traces: list[dict], path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for tr in traces:
            f.write(json.dumps(tr, ensure_ascii=False) + "\n")


def load_trace_files(paths: list[str]) -> list[dict]:
    out, seen = [], set()
    for p in paths:
        try:
            trs = load_traces(p)
        except OSError as e:
            raise ValueError(f"cannot read traces {p}: {e.strerror}; make them with `livekv bench traces ... --out {p}`")
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSONL ({e}); give a file written by `livekv bench traces`")
        for tr in trs:
            missing = {"id", "old_text", "new_text", "steps"} - tr.keys()
            if missing:
                raise ValueError(f"{p}: a trace lacks {sorted(missing)}; give a file written by `livekv bench traces`")
            if tr["id"] in seen:  # the same pair twice would be replayed, and counted, twice
                log(f"{p}: trace {tr['id']} was already read; skipping the copy")
                continue
            seen.add(tr["id"])
            out.append(tr)
    return out


def quick_traces() -> list[dict]:
    """A few PIE-style synthetic traces on bisect.py (~900 tokens of real code); no network."""
    import bisect as module
    import random
    text, out = Path(module.__file__).read_text(encoding="utf-8"), []
    for kind in ("insert", "delete", "multi"):
        out += synthetic_traces(text, "bisect.py", kind, 2, random.Random(f"quick:{kind}"))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (also `livekv bench traces`); returns the exit code."""
    ap = argparse.ArgumentParser(prog="livekv bench traces", description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("releases", nargs="*", metavar="PACKAGE==OLD:NEW", help="release pairs to diff, e.g. flask==3.0.3:3.1.0")
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--wheel-dir", type=Path, help="take wheels/sdists from this folder instead of pip (offline)")
    ap.add_argument("--synthetic", nargs="+", metavar="FILE_OR_DIR", help="build PIE-style traces on these .py files")
    ap.add_argument("--kinds", default=",".join(KINDS), help="synthetic kinds, comma-separated (default: %(default)s)")
    ap.add_argument("--per-file", type=int, default=5, help="synthetic traces per kind per file (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic sampling seed (default: %(default)s)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.releases and not args.synthetic:
        ap.error("name at least one PACKAGE==OLD:NEW or pass --synthetic FILE_OR_DIR")
    if bad := [k for k in kinds if k not in KINDS]:
        ap.error(f"unknown --kinds {','.join(bad)}; choose from {','.join(KINDS)}")
    if args.per_file < 1:
        ap.error("--per-file must be at least 1")

    traces, failed = [], []
    for spec in args.releases:
        t0 = time.perf_counter()
        try:
            pkg, old, new = parse_spec(spec)
            log(f"{pkg} {old} -> {new}: fetching")
            got, c = release_traces(pkg, old, new, args.wheel_dir)
            if not got:
                raise ReleaseError(f"{spec}: no .py file differs between the two releases "
                                   f"({c.get('files_unchanged', 0)} identical, {c.get('files_added', 0)} added, "
                                   f"{c.get('files_removed', 0)} removed); pick releases further apart")
        except ReleaseError as e:
            log(f"error: {e}")
            failed.append(spec)
            continue
        traces += got
        log(f"{pkg} {old} -> {new}: {c.get('files_changed', 0)} changed files "
            f"(skipped {c['files_added']} added, {c['files_removed']} removed, {c['files_undecodable']} undecodable), "
            f"{c.get('hunks', 0)} hunks, {c.get('format_only', 0)} format-only, "
            f"{c.get('no_target', 0)} without a substantive line, {c.get('predictions', 0)} prediction points, "
            f"{time.perf_counter() - t0:.1f}s")
    if args.synthetic:
        t0 = time.perf_counter()
        try:
            got, c = synthetic_all(args.synthetic, kinds, args.per_file, args.seed)
        except ReleaseError as e:
            log(f"error: {e}")
            return 1
        traces += got
        log(f"synthetic: {c.get('files', 0)} files ({c.get('files_unreadable', 0)} not UTF-8, skipped), "
            + ", ".join(f"{c.get(k, 0)} {k}" for k in kinds) + f" traces, {time.perf_counter() - t0:.1f}s")
    if not traces:
        log(f"error: no traces to write; {args.out} left untouched")
        return 1
    write_traces(traces, args.out)
    log(f"wrote {len(traces)} traces to {args.out}")
    if failed:
        log(f"error: {len(failed)} release pair(s) failed ({', '.join(failed)}); the file holds the others only")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
