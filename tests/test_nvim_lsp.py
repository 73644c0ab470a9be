"""A real editor: headless Neovim 0.7 starts `livekv lsp`, edits a file through its buffer API
(byte columns, converted to UTF-16 by Neovim itself) and asks for textDocument/completion. The
answer must be the Engine's completion on the same final text."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import excerpt, stdlib_source
from livekv.incremental.config import default_cache_dir
from lsp_helpers import ROOT, expected_completion, server_command, server_env, sha

NVIM = shutil.which("nvim")


# a mark, not pytest.skip in the body: skipping then costs no model load for the engine fixture
@pytest.mark.skipif(NVIM is None, reason="nvim is not on PATH: install Neovim 0.7+ (apt-get install neovim)")
def test_neovim_completion_matches_the_engine(tmp_path, engine):
    head = "# 😀 naïve "
    text = head + "你好\n" + excerpt(stdlib_source(), 183, 32)
    path = tmp_path / "mod.py"
    path.write_text(text, encoding="utf-8")
    lines = text.split("\n")
    k = lines.index("        self.set_seq1(a)")
    new_line, typed = '        s = "😀 你好"', "; self.set_"
    b = lambda s: len(s.encode("utf-8"))  # noqa: E731  Neovim's API columns are bytes
    edits = [dict(row=0, col=b(head), end_row=0, end_col=b(head + "你好"), lines=["世界"]),
             dict(lines_from=k + 1, lines_to=k + 1, lines=[new_line]),
             dict(row=k + 1, col=b(new_line), end_row=k + 1, end_col=b(new_line), lines=[typed])]
    lines[0] = head + "世界"
    lines.insert(k + 1, new_line + typed)
    final = "\n".join(lines)
    row, line = k + 1, new_line + typed

    spec = tmp_path / "spec.json"
    # Neovim's LSP log goes under tmp (XDG_CACHE_HOME); the server keeps its model cache
    cmd = server_command("--cache-dir", str(default_cache_dir()))
    spec.write_text(json.dumps(dict(file=str(path), cmd=cmd, edits=edits, row=row, col=b(line))))
    out = tmp_path / "out.json"
    env = dict(server_env(), LIVEKV_SPEC=str(spec), LIVEKV_OUT=str(out), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_STATE_HOME=str(tmp_path / "state"))
    proc = subprocess.run([NVIM, "--headless", "--clean", "-u", str(ROOT / "tests" / "nvim" / "minimal.lua")],
                          env=env, cwd=ROOT, capture_output=True, timeout=300)
    logs = sorted(tmp_path.glob("*/nvim/lsp.log"))
    where = f"nvim exited {proc.returncode}; stderr: {proc.stderr.decode()[-2000:]}; LSP log: {[str(p) for p in logs]}"
    assert out.exists(), where
    got = json.loads(out.read_text())
    assert "failure" not in got, f"{got['failure']}\n{where}"

    assert got["text"] == final, "the buffer edits did not give the expected text"
    assert got["stats"]["text_sha256"] == sha(final), "the server's text differs from Neovim's buffer"
    assert got["position"]["character"] == len(line.encode("utf-16-le")) // 2  # the emoji is 2 UTF-16 units
    want = expected_completion(engine, final, row, len(line))
    assert want, "pick a cursor where the model completes something"
    assert got.get("error") is None, got["error"]
    assert [i["textEdit"]["newText"] for i in got["completion"]["items"]] == [want]
