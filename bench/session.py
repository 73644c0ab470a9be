"""A typing session on a real file, for the agreement curve: the edits an editor sends while a
person works, not a release diff. Three kinds, mixed:

- retype: a line is deleted, then typed back in bursts of a few characters (one edit each, as
  didChange arrives between pauses);
- delete: a line goes;
- rename: a name used several times becomes another, every occurrence in one batch (an editor's
  rename, one didChange with many changes).

session_trace() makes a trace whose steps are those batches (docs/traces.md's format, with
"session": true); the curve replays each step as one edit_batch and probes after it.
"""
from __future__ import annotations

import keyword
import random
import re

from livekv.incremental.lines import line_starts, resolve, split_lines, to_position

from .hunks import is_substantive

NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{2,}\b")
KINDS = ("retype", "retype", "delete", "rename")  # retyping is most of what a person does


def _pos(text: str, offset: int) -> list[int]:
    return list(to_position(line_starts(text), text, offset))


def _edit(text: str, a: int, b: int, new: str) -> tuple[dict, str]:
    e = {"start": _pos(text, a), "end": _pos(text, b), "text": new}
    return e, text[:a] + new + text[b:]


def _line_span(text: str, rng: random.Random) -> tuple[int, int] | None:
    lines = split_lines(text)
    good = [i for i, ln in enumerate(lines[:-1]) if is_substantive(ln) and ln.endswith("\n")]
    if not good:
        return None
    i = rng.choice(good)
    a = sum(len(ln) for ln in lines[:i])
    return a, a + len(lines[i])


def session_steps(text: str, n_steps: int, rng: random.Random) -> list[list[dict]]:
    """Up to n_steps batches of edits, each as an editor sends it, applied to text in order."""
    steps: list[list[dict]] = []
    while len(steps) < n_steps:
        kind = rng.choice(KINDS)
        span = _line_span(text, rng)
        if span is None:
            break
        a, b = span
        if kind == "delete":
            e, text = _edit(text, a, b, "")
            steps.append([e])
        elif kind == "retype":
            line = text[a:b]
            e, text = _edit(text, a, b, "")
            steps.append([e])
            at = a
            while at < a + len(line) and len(steps) < n_steps:  # bursts of typing
                burst = line[at - a: at - a + rng.randint(3, 12)]
                e, text = _edit(text, at, at, burst)
                steps.append([e])
                at += len(burst)
            if at < a + len(line):  # the session ended mid-line: finish it in the last step
                e, text = _edit(text, at, at, line[at - a:])
                steps[-1].append(e)
        else:
            counts: dict[str, int] = {}
            for m in NAME.finditer(text):
                if not keyword.iskeyword(m[0]):
                    counts[m[0]] = counts.get(m[0], 0) + 1
            names = sorted(n for n, c in counts.items() if 3 <= c <= 40)
            if not names:
                continue
            old = rng.choice(names)
            new = old + "_" + rng.choice(("new", "v2", "tmp", "obj"))
            batch, shift = [], 0
            for m in re.finditer(rf"\b{re.escape(old)}\b", text):  # each relative to the one before
                e, text = _edit(text, m.start() + shift, m.end() + shift, new)
                batch.append(e)
                shift += len(new) - len(old)
            steps.append(batch)
    return steps


def session_trace(text: str, path: str, n_steps: int = 100, seed: int = 0) -> dict:
    """A trace of a typing session on text (see the module's docstring)."""
    steps = session_steps(text, n_steps, random.Random(f"{seed}:{path}"))
    final = resolve(text, [((tuple(e["start"]), tuple(e["end"])), e["text"]) for s in steps for e in s])[0]
    return {"id": f"session:{seed}:{path}", "source": "session", "session": True, "path": path,
            "old_text": text, "new_text": final, "steps": [{"edits": s, "predict": None} for s in steps]}
