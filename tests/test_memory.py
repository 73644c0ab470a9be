"""Memory is bounded for real: closing files gives their memory back to the system, and one
file larger than the whole cache budget is refused with a message that says what to do."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import stdlib_source
from lsp_helpers import ROOT, server_env
from livekv.incremental.groups import Workspace


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mappings are read from /proc")
def test_the_loaded_weights_do_not_keep_the_model_file_mapped(engine):
    """A mapping of the converted model file stays resident whole while any tensor viewing it
    lives, so the loaded weights own their memory (models.own_memory): once loaded, the file is
    not mapped, and weights released or fused into copies leave the process."""
    gc.collect()
    assert engine.model.hf is not None
    mapped = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if ln.endswith(".safetensors")]
    assert not mapped, mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc")
def test_closing_every_file_gives_the_memory_back(tmp_path):
    """The benchmark in a fresh process (its resident memory is its own): 12 files through a
    2,000-token budget (evictions included), each completed in, then all closed."""
    out = subprocess.run([sys.executable, "-m", "livekv", "bench", "memory", "--files", "12", "--file-tokens", "400",
                          "--max-cache-tokens", "2000", "--precision", "fp32", "--out", str(tmp_path)],
                         env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "memory.json").read_text())
    assert max(s["tokens"] for s in r["steps"]) <= 2000 and max(s.get("evicted", 0) for s in r["steps"]) > 0
    held = max(s["tokens"] for s in r["steps"]) * r["kv_bytes_per_1k_tokens"] / 1000
    assert r["grown_at_peak"] > 0.5 * held, r  # the files did cost memory (their K/V at least)...
    assert r["kept_after_close"] < 0.25 * r["grown_at_peak"], r  # ...and closing them gave it back
    assert r["steps"][-1]["tokens"] == 0


def test_a_file_over_the_whole_budget_is_refused_and_nothing_is_left_open(engine):
    ws = Workspace(engine, span=1024, max_cache_tokens=300)
    small = stdlib_source()[:400]
    ws.set_context("file:///small.py", small)
    with pytest.raises(ValueError, match=r"big\.py is [\d,]+ tokens.*maxCacheTokens 300.*MiB per 1,000 tokens.*raise maxCacheTokens"):
        ws.set_context("file:///big.py", stdlib_source()[:4000])
    assert list(ws.contexts) == ["file:///small.py"] and "file:///big.py" not in ws.evicted
    assert ws.tokens() <= 300 and ws.contexts["file:///small.py"].text == small
