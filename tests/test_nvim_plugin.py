"""The Neovim plugin (editor-clients/nvim) in a real Neovim 0.7, typed into as a person would:
keys go in over Neovim's RPC (nvim_input), so its insert-mode events and the plugin's debounce,
cancellation, ghost text and <Tab> mapping all run for real against the real `livekv lsp`.
The ghost text must be the engine's completion of the typed text, and <Tab> must insert it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import excerpt, stdlib_source
from livekv.incremental.config import default_cache_dir
from lsp_helpers import EXACT, ROOT, expected_completion, server_env, sha

NVIM = shutil.which("nvim")
INIT = ROOT / "editor-clients" / "nvim" / "tests" / "init.lua"
MAX_NEW = 6


def _pynvim_missing() -> str | None:
    if importlib.util.find_spec("pynvim") is None:
        return "pynvim is not installed: pip install -e '.[test]'"
    return None


pytestmark = [
    pytest.mark.skipif(NVIM is None, reason="nvim is not on PATH: install Neovim 0.7+ (apt-get install neovim)"),
    pytest.mark.skipif(_pynvim_missing() is not None, reason=_pynvim_missing() or ""),
]


def lsp_log(tmp_path: Path, tail: int | None = 3000) -> str:
    logs = sorted(tmp_path.glob("*/nvim/lsp.log"))
    return f"LSP log {logs[0]}:\n{logs[0].read_text()[-tail if tail else 0:]}" if logs else "no LSP log"


class Editor:
    """A headless Neovim driven over RPC, with polling helpers (waits on state, never on time)."""

    def __init__(self, nvim):
        self.nvim = nvim
        self.ns = nvim.exec_lua("return vim.api.nvim_create_namespace('livekv')")

    def lua(self, code: str, *args):
        return self.nvim.exec_lua(code, *args)

    def wait(self, code: str, what: str, *args, timeout: float = 120.0):
        """Poll a Lua chunk until it returns something truthy; that value."""
        end = time.monotonic() + timeout
        while not (got := self.lua(code, *args)):
            assert time.monotonic() < end, f"gave up waiting for {what}; plugin state {self.state()}"
            time.sleep(0.01)
        return got

    def state(self) -> dict:
        return self.lua("return require('livekv').state()") or {}

    def text(self) -> str:
        return "\n".join(self.nvim.current.buffer[:]) + "\n"

    def ghost(self, row: int, col: int) -> tuple[str, int]:
        """The suggestion shown by the extmark at (row, col) (its virtual text, then one line per
        virtual line) and the extmark's id."""
        marks = self.wait("""local ns, row, col = ...
            local m = vim.api.nvim_buf_get_extmarks(0, ns, {row, col}, {row, col}, {details = true})
            return #m > 0 and m or nil""", f"ghost text at {row}:{col}", self.ns, row, col)
        assert len(marks) == 1, marks
        d = marks[0][3]
        assert d.get("virt_text") or d.get("virt_lines"), d
        chunks = lambda line: "".join(c[0] for c in line)  # noqa: E731
        return chunks(d.get("virt_text", [])) + "".join("\n" + chunks(v) for v in d.get("virt_lines", [])), marks[0][0]

    def stats(self) -> dict:
        self.lua("_G.livekv_test_stats = nil; require('livekv').stats(0, function(s, e) _G.livekv_test_stats = s or {error = e} end)")
        got = self.wait("return _G.livekv_test_stats", "livekv/stats")
        assert "error" not in got, got
        return got


def neovim(tmp_path: Path, monkeypatch, **env: str) -> Editor:
    """A headless Neovim 0.7 with this checkout's plugin (editor-clients/nvim/tests/init.lua);
    env: more of its environment (LIVEKV_MAX_PROMPT_MS)."""
    import pynvim

    # pynvim starts Neovim with this process's environment; Neovim passes it on to the server
    for name, value in {**server_env(), **env}.items():
        monkeypatch.setenv(name, value)
    livekv = Path(sys.executable).with_name("livekv")
    cmd = [str(livekv)] if livekv.exists() else [sys.executable, "-m", "livekv"]
    cmd += ["lsp", "--cache-dir", str(default_cache_dir()), *EXACT]
    monkeypatch.setenv("LIVEKV_CMD", json.dumps(cmd))
    monkeypatch.setenv("LIVEKV_NATIVE", "0")  # the plugin's own ghost text, even on a Neovim with its own
    monkeypatch.setenv("LIVEKV_MAX_NEW_TOKENS", str(MAX_NEW))
    # Neovim's LSP log (0.7: $XDG_CACHE_HOME/nvim, later: $XDG_STATE_HOME/nvim); the server keeps
    # its converted model in the usual cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return Editor(pynvim.attach("child", argv=[NVIM, "--embed", "--headless", "--clean", "-u", str(INIT)]))


def server_pid(ed: Editor, tmp_path: Path) -> int:
    """Once the plugin's client has initialized: the server's pid."""
    started = ed.wait("""local s = require('livekv').state()
        if s and s.exit_code then return {exit_code = s.exit_code} end
        local c = s and vim.lsp.get_client_by_id(s.client_id)
        return c and c.initialized and {pid = c.rpc.pid}""", "the plugin to start livekv lsp")
    assert "pid" in started, f"livekv lsp exited with code {started['exit_code']}; {lsp_log(tmp_path)}"
    return started["pid"]


def quit_neovim(ed: Editor, pid: int | None) -> None:
    try:
        ed.nvim.command("qa!")
    except Exception:  # the RPC channel closes as Neovim exits
        pass
    if pid:
        _reap(pid)


def test_neovim_ghost_text_and_tab(tmp_path, monkeypatch, engine):
    text = excerpt(stdlib_source(), 183, 32)  # difflib's set_seqs and set_seq1: about 250 tokens
    path = tmp_path / "mod.py"
    path.write_text(text, encoding="utf-8")
    lines = text.split("\n")
    k = lines.index("        self.set_seq2(b)")
    ed = neovim(tmp_path, monkeypatch)
    nvim, pid = ed.nvim, None
    try:
        nvim.command(f"edit {path}")
        assert nvim.current.buffer.options["filetype"] == "python"
        nvim.command("setlocal expandtab shiftwidth=4 softtabstop=4")  # as Python's ftplugin sets them
        pid = server_pid(ed, tmp_path)
        assert not ed.state()["native"]
        ed.stats()  # queued behind the first encode: the file is ready

        # Open a line below set_seq2(b): autoindent gives 8 spaces, <BS> takes 4 (softtabstop)
        # and <Tab>, with no suggestion shown, is a plain Tab again (4 spaces); then type.
        nvim.current.window.cursor = (k + 1, 0)
        nvim.input("o<BS><Tab>")
        ed.wait("local row = ...; return vim.api.nvim_get_mode().mode == 'i' and vim.api.nvim_buf_get_lines(0, row, row + 1, true)[1] == '        '",
                "o<BS><Tab> to give 8 spaces", k + 1, timeout=30)
        # Faster than the debounce: one request, for the whole line. (A pause mid-line would let
        # the server remember a suggestion there and answer the rest of it if typed along, which
        # is not what the engine suggests for the line opened fresh.)
        typed = "        self.a = a"
        nvim.input("self.a = a")
        row, col = k + 1, len(typed)
        ed.wait("local row, line = ...; return vim.api.nvim_buf_get_lines(0, row, row + 1, true)[1] == line",
                "the typed line", row, typed, timeout=30)
        final = ed.text()
        assert final == "\n".join(lines[: k + 1] + [typed] + lines[k + 1:])

        want = expected_completion(engine, final, row, col, MAX_NEW)
        assert "\n" in want, f"pick a cursor where the suggestion spans lines (virt_lines): {want!r}"
        ghost, mark = ed.ghost(row, col)
        assert ghost == want
        assert ed.state()["shown"] == want
        assert ed.stats()["text_sha256"] == sha(final), "the server's text differs from the buffer"

        # any other key clears it (that extmark goes; a new suggestion would be a new extmark)
        nvim.input("x")
        ed.wait("local ns, mark, row, line = ...; return vim.api.nvim_buf_get_lines(0, row, row + 1, true)[1] == line "
                "and #vim.api.nvim_buf_get_extmark_by_id(0, ns, mark, {}) == 0",
                "'x' to clear the ghost text", ed.ns, mark, row, typed + "x", timeout=30)
        nvim.input("<BS>")  # the same text again: the same suggestion
        assert ed.ghost(row, col)[0] == want

        nvim.input("<Tab>")
        first, *rest = want.split("\n")
        accepted = [typed + first] + rest
        ed.wait("local row, n, want = ...; return vim.deep_equal(vim.api.nvim_buf_get_lines(0, row, row + n, true), want)",
                "<Tab> to insert the suggestion", row, len(accepted), accepted, timeout=30)
        assert ed.text() == final[: final.index(typed) + len(typed)] + want + final[final.index(typed) + len(typed):]
        assert tuple(nvim.current.window.cursor) == (row + len(accepted), len(accepted[-1]))
        assert nvim.api.get_mode()["mode"] == "i"

        # Typing on, with a pause after each key long enough for a request to go out: the next
        # key makes it stale and the plugin cancels it ($/cancelRequest). A reply may beat the
        # key (the model may have guessed the key): then the next one.
        cancels, sent = ed.state()["cancels"], lsp_log(tmp_path, tail=None).count('"$/cancelRequest"')
        for ch in " 7 + 13 - 2 * 9":
            before = ed.state()
            if before["cancels"] > cancels:
                break
            nvim.input(ch)
            ed.wait("local n = ...; return require('livekv').state().requests > n", "a request after a pause",
                    before["requests"], timeout=30)
        assert ed.state()["cancels"] > cancels, "every request was answered before the next key"
        assert lsp_log(tmp_path, tail=None).count('"$/cancelRequest"') > sent, lsp_log(tmp_path)

        ed.lua("""local c = vim.lsp.get_client_by_id(require('livekv').state().client_id)
            local new = vim.fn.has('nvim-0.11') == 1
            if new then c:stop() else c.stop() end
            vim.wait(20000, function() if new then return c:is_stopped() end return c.is_stopped() end, 20)""")
    finally:
        quit_neovim(ed, pid)


@pytest.mark.parametrize("max_prompt_ms", [0, 100])
def test_a_key_typed_while_the_server_starts_gets_its_suggestion(tmp_path, monkeypatch, max_prompt_ms):
    """Issue 17 §8: one key typed a moment after opening a 90-line file, while the server is still
    starting and loading the model, and then nothing: its ghost text must come all the same. The
    key comes before the server has answered `initialize` (the plugin asks again once it is
    attached); under maxPromptMs the server answers that request empty, the file not being encoded
    yet, and sends livekv/refresh once it is (the plugin asks again)."""
    text = excerpt(stdlib_source(), 183, 90)  # difflib's SequenceMatcher setters: about 700 tokens
    path = tmp_path / "mod.py"
    path.write_text(text, encoding="utf-8")
    k = text.split("\n").index("        self.b = b")  # ~430 tokens in
    env = {"LIVEKV_MAX_PROMPT_MS": str(max_prompt_ms)} if max_prompt_ms else {}
    ed = neovim(tmp_path, monkeypatch, **env)
    nvim, pid = ed.nvim, None
    try:
        start = time.monotonic()
        nvim.command(f"edit {path}")
        nvim.current.window.cursor = (k + 1, 0)
        nvim.input("A<CR>")  # one key: a new line, indented as the one above ('autoindent')
        initialized = ed.lua("local c = vim.lsp.get_client_by_id(require('livekv').state().client_id); "
                             "return c ~= nil and c.initialized")
        row, col = k + 1, 8
        ghost, _ = ed.ghost(row, col)  # waits up to 120 s: a hang guard, not a timing
        first = time.monotonic() - start
        pid = server_pid(ed, tmp_path)
        state = ed.state()
        assert ghost.strip() and state["shown"] == ghost, state
        assert ed.text() == text.replace("self.b = b\n", "self.b = b\n        \n", 1)
        if max_prompt_ms:  # the first answer was empty: the refresh brought the suggestion
            assert state["refreshes"] >= 1 and '"livekv/refresh"' in lsp_log(tmp_path, tail=None), state
        assert initialized or state["attach_asks"] == 1, "a key before initialize: asked once attached"

        # warm: the next key's ghost text, for comparison
        nvim.input("<Esc>")
        ed.wait("return vim.api.nvim_get_mode().mode == 'n'", "normal mode", timeout=30)
        nvim.current.window.cursor = (k + 1, 0)
        start = time.monotonic()
        nvim.input("A<CR>")
        ed.ghost(row, col)
        print(f"\nNeovim, maxPromptMs {max_prompt_ms}: first ghost text {first:.1f} s after opening the file "
              f"and typing at once (cold server); warm, {time.monotonic() - start:.2f} s after a key")
    finally:
        quit_neovim(ed, pid)


def _reap(pid: int) -> None:
    """Wait for the server to exit after shutdown (or its stdin closing); kill it after 10 s."""
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(500):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited; a zombie until something reaps it
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
