"""`livekv bench precision`: the points it completes at, and its summary's arithmetic."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from livekv.bench.precision import points, projection_rows, rows_table, summarize, table

from conftest import stdlib_source

LINE = st.sampled_from(["x = 1\n", "    return y\n", "# note\n", "\n", "   \n", "def f(a):\n"])


@settings(max_examples=60, deadline=None)
@given(st.lists(LINE, min_size=1, max_size=60), st.integers(1, 20))
def test_points_are_distinct_statement_lines_in_order(lines, k):
    text = "".join(lines)
    got = points(text, k)
    good = [i for i, ln in enumerate(lines) if i > 2 and ln.strip() and not ln.lstrip().startswith("#")]
    assert got == sorted(set(got)) and set(got) <= set(good) and len(got) == min(k, len(good))


def test_points_on_a_real_file_spread_over_it():
    text = stdlib_source()
    got = points(text, 10)
    n = len(text.splitlines())
    assert len(set(got)) == 10 and got[0] < n // 5 and got[-1] > n // 2


def test_summary_scores_against_fp32_and_divides_by_its_encode():
    rows = [dict(kind="full", precision=p, length=100, tokens=98, wall_ms=w, cpu_ms=w) for p, w in
            (("fp32", 900.0), ("int4", 300.0))]
    for line, (a, b) in enumerate([("x", "x"), ("y", "z"), ("w", "w"), ("", "")]):
        rows.append(dict(kind="point", precision="fp32", length=100, line=line, text=a, ttft_ms=10.0, line_ms=90.0,
                         decode_ms_per_token=40.0, cpu_ms_per_step=40.0, agree=True))
        rows.append(dict(kind="point", precision="int4", length=100, line=line, text=b, ttft_ms=8.0, line_ms=60.0 + line,
                         decode_ms_per_token=30.0 + line, cpu_ms_per_step=30.0, agree=a == b))
    s = {r["precision"]: r for r in summarize(rows)}
    assert s["int4"]["agreement"] == 0.75 and s["fp32"]["agreement"] == 1.0
    assert s["int4"]["full_speedup_cpu"] == 3.0 and s["int4"]["decode_ms_p50"] == 31.5
    assert "| 98 | int4 | 300 (300, 3.00×) | 8 | 62 | 31.5 (30.0) | 0.750 (4) |" in table(summarize(rows))


def test_projection_rows_time_every_format_at_every_row_count(tiny_engine):
    timings = projection_rows(tiny_engine.model, [1, 3], reps=3)
    assert [(t["rows"], t["format"]) for t in timings] == [(r, m) for r in (1, 3) for m in ("fp32", "bf16", "int8", "int4")]
    assert all(t["us"] > 0 for t in timings)
    table_ = rows_table(timings)
    assert table_.splitlines()[0] == "| query rows | fp32 µs | bf16 µs | int8 µs | int4 µs |" and len(table_.splitlines()) == 4


def test_the_open_is_the_median_of_its_opens():
    rows = [dict(kind="full", precision=p, length=100, tokens=98, wall_ms=w, cpu_ms=w) for p, ws in
            (("fp32", (900.0, 2000.0, 950.0)), ("int4", (300.0, 250.0, 900.0))) for w in ws]
    s = {r["precision"]: r for r in summarize(rows)}
    assert s["fp32"]["full_ms"] == 950.0 and s["int4"]["full_cpu_ms"] == 300.0
    assert s["int4"]["full_speedup_cpu"] == 950.0 / 300.0
