"""`livekv bench gpu`, the script a session with a GPU runs once: its dry run on the CPU (tiny
shapes, the Triton kernel interpreted) must give numbers for every part, a failing part must not
lose the others, and without CUDA it must refuse. Numbers are checked for being there and right,
never for being fast."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livekv.bench.gpu import PARTS, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_gpu(out, *args: str) -> subprocess.CompletedProcess:
    # -P, as on the device: the repository root off sys.path (its kernels/ shadows a package)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-P", "-m", "livekv", "bench", "gpu", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_the_dry_run_gives_every_part_numbers(tmp_path):
    run = bench_gpu(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["env"]["dry_run"] is True and res["env"]["triton_interpret"] == "1"
    parts = res["parts"]
    assert list(parts) == list(PARTS)
    for name, part in parts.items():
        assert part["error"] is None, (name, part["error"])
        assert part["rows"], name

    kernel = parts["kernel"]["rows"]
    assert {(r["path"], r["dtype"]) for r in kernel} == {(p, d) for p in ("triton", "torch")
                                                        for d in ("float32", "bfloat16")}
    for r in kernel:
        assert positive(r["ms"]) and positive(r["GB_s"]) and r["zero_delta_bits_kept"] is True, r
        assert r["rel_err"] < (1e-6 if r["dtype"] == "float32" else 1e-2), r  # fp32 math, one rounding

    decode = parts["decode"]["rows"]
    assert {r["variant"] for r in decode} == {"engine step (eager)", "fixed shape (eager)", "cuda graph replay"}
    assert all(positive(r["ms_per_step"]) for r in decode)
    assert all(r["max_logit_diff_vs_eager"] == 0 for r in decode if r["variant"] == "cuda graph replay")

    for r in parts["edit"]["rows"]:
        assert positive(r["full_ms_p50"]) and positive(r["pie_ms_p50"]) and r["edits"] == 3, r
        # full re-encodes the file; pie encodes the edited line and rotates what follows it
        assert r["full_encoded"] >= 0.9 * r["file_tokens"] > r["pie_encoded"] > 0 and r["pie_rotated"] > 0, r
    assert len(parts["edit"]["rows"]) == 2

    comp = [r for r in parts["compile"]["rows"] if r["variant"].startswith("torch.compile")]
    assert len(comp) == 1 and positive(comp[0]["ms_per_step"]) and comp[0]["graphs"] >= 1
    assert comp[0]["max_logit_diff_vs_eager"] < 1e-4  # backend "eager": the same arithmetic

    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name} (" in md for name in PARTS) and "failed" not in md


def test_a_failing_part_keeps_the_parts_after_it(tmp_path):
    run = bench_gpu(tmp_path, "--dry-run", "--parts", "edit,decode", "--lengths", "99999999")
    assert run.returncode == 1
    assert "part(s) edit failed" in run.stderr
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert "stdlib corpus has only" in parts["edit"]["error"] and parts["edit"]["rows"] == []
    assert parts["decode"]["error"] is None and len(parts["decode"]["rows"]) == 3
    assert "**failed**: ValueError" in (tmp_path / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusing is what it does without CUDA")
def test_without_cuda_it_refuses_and_says_why(tmp_path):
    run = bench_gpu(tmp_path)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "--dry-run" in run.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_the_readme_gives_the_scripts_device_command():
    from livekv.bench import gpu
    command = [ln.strip() for ln in gpu.__doc__.splitlines() if ln.strip().startswith("python3 -m pip install")]
    assert len(command) == 1 and "livekv bench gpu --out $OUT" in command[0]
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert command[0] in readme, "README's Results give another device command than bench/gpu.py"


CELL = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False),
                 st.booleans(), st.text(st.characters(blacklist_characters="\\"), max_size=8))


@given(st.lists(st.dictionaries(st.sampled_from(["ms", "path", "tokens", "GB_s"]), CELL, min_size=1), max_size=6))
@settings(max_examples=60, deadline=None)
def test_each_row_is_one_table_line_with_every_column(rows):
    res = {"env": {"dry_run": True, "torch": "x"}, "parts": {"kernel": {"rows": rows, "notes": [], "error": None,
                                                                      "seconds": 1.0}}}
    lines = markdown(res).splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    if not rows:
        assert table == []
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    assert table[0] == "| " + " | ".join(cols) + " |"
    assert len(table) == 2 + len(rows)
    assert all(len(re.findall(r"(?<!\\)\|", ln)) == len(cols) + 1 for ln in table[2:])
