"""`livekv bench team` for real, small: two editors against a batched and a serial `livekv serve`
(real processes, the embedded model), sharing one context file."""
from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from conftest import stdlib_source
from livekv.bench.team_editor import typing
from livekv.incremental.lines import resolve
from lsp_helpers import ROOT, server_env

TEXT = stdlib_source()[20000:30000]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(0, 10**6))
def test_a_typing_trace_pauses_as_asked_and_puts_every_line_back(completions, seed):
    """Each pause comes after a burst that ends at the cursor it names; the file is its own text
    again at the end (every line retyped whole)."""
    steps = typing(TEXT, completions, seed)
    assert sum(st_.complete for st_ in steps) == completions
    text = TEXT
    for st_ in steps:
        text, _ = resolve(text, [((tuple(c["range"]["start"].values()), tuple(c["range"]["end"].values())), c["text"])
                                 for c in st_.changes], "utf-16")
        if st_.complete:  # the burst just typed ends at the cursor
            line = text.split("\n")[st_.line]
            assert st_.changes[0]["text"] and line[: st_.character].endswith(st_.changes[0]["text"])
    assert text == TEXT


def test_the_load_test_runs_both_servers_and_holds_the_shared_context_once(tmp_path):
    """Both servers answer every completion; the batched one gets --batched-args."""
    out = subprocess.run([sys.executable, "-m", "livekv", "bench", "team", "--editors", "1,2", "--completions", "2",
                          "--file-tokens", "600", "--context-files", "1", "--context-tokens", "200",
                          "--max-new-tokens", "4", "--batched-args=--first-passes-first", "--out", str(tmp_path)],
                         env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "team.json").read_text())
    rows = result["rows"]
    assert "--first-passes-first" in result["servers"]["batched"]  # --batched-args reached the batched server
    assert "--first-passes-first" not in result["servers"]["serial"]
    assert sorted((r["server"], r["editors"]) for r in rows) == [("batched", 1), ("batched", 2), ("serial", 1),
                                                                   ("serial", 2)]
    for r in rows:
        assert r["completions"] == 2 * r["editors"] and r["cancelled"] == 0 and r["throughput"] > 0
        assert 0 < r["first_p50"] <= r["line_p50"] and r["lone_first_p50"] > 0
    two = [r for r in rows if r["editors"] == 2]
    assert all(r["cache"]["shared_groups"] == 1 and r["cache"]["shared_tokens"] > 0 for r in two)  # held once
    assert next(r for r in two if r["server"] == "batched")["passes_per_step"] >= 1
    assert next(r for r in two if r["server"] == "serial")["passes_per_step"] is None  # the serial server batches nothing
    assert all(r["ahead_steps"] == 0 for r in rows if r["server"] == "serial")
    assert (tmp_path / "team.png").stat().st_size > 0 and "| 2 | batched |" in (tmp_path / "team.md").read_text()


def test_the_step_benchmark_times_each_width_against_one_pass(tmp_path):
    out = subprocess.run([sys.executable, "-m", "livekv", "bench", "team-step", "--passes", "2,1", "--file-tokens", "300",
                          "--context-files", "1", "--context-tokens", "100", "--steps", "3", "--reps", "1",
                          "--out", str(tmp_path)], env=server_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "team_step.json").read_text())["rows"]
    assert [r["passes"] for r in rows] == [1, 2] and rows[0]["x_one"] == 1
    assert all(r["step_ms"] > 0 for r in rows) and rows[1]["x_one"] == rows[1]["step_ms"] / rows[0]["step_ms"]
    assert "| 2 |" in out.stdout
