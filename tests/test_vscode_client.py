"""The VS Code extension's node test (editor-clients/vscode/src/test/server.test.ts): it sends the
extension's own requests (src/requests.ts) to the real `livekv lsp` and compares the suggestion
with `livekv complete` on the same text. Needs node and `npm ci` in editor-clients/vscode
(scripts/test.sh runs it); VS Code itself is not needed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lsp_helpers import ROOT, server_env

VSCODE = ROOT / "editor-clients" / "vscode"
NODE, NPM = shutil.which("node"), shutil.which("npm")
COMPILED = VSCODE / "out" / "test" / "server.test.js"


def _missing() -> str | None:
    if NODE is None or NPM is None:
        return "node/npm are not on PATH: install Node.js 20+"
    if not (VSCODE / "node_modules" / "vscode-languageserver-protocol").is_dir():
        return f"no node_modules in {VSCODE}: run `npm ci` there (scripts/test.sh does)"
    return None


def _stale() -> bool:
    if not COMPILED.exists():
        return True
    built = COMPILED.stat().st_mtime
    return any(p.stat().st_mtime > built for p in (VSCODE / "src").rglob("*.ts"))


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_vscode_extension_requests_against_the_real_server():
    if _stale():  # a fresh checkout, or sources edited since the last compile
        subprocess.run([NPM, "run", "--silent", "compile"], cwd=VSCODE, check=True, timeout=300)
    livekv = Path(sys.executable).with_name("livekv")
    env = dict(server_env(), LIVEKV_SERVER=str(livekv) if livekv.exists() else (shutil.which("livekv") or ""))
    assert env["LIVEKV_SERVER"], "no livekv executable next to this Python or on PATH: pip install -e ."
    proc = subprocess.run([NODE, "--test", str(COMPILED.relative_to(VSCODE))], cwd=VSCODE, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    # node --test exits 0 when it finds no test at all: make sure the server test ran and passed
    assert "ok 2 - the extension's requests get the engine's suggestion from livekv lsp" in out, out[-4000:]
    assert "# fail 0" in out and "# skipped 0" in out, out[-4000:]


def test_the_extension_offers_every_strategy():
    """The setting's choices in package.json and requests.ts are the engine's strategies."""
    import json
    import re
    from livekv.incremental import STRATEGIES
    conf = json.loads((VSCODE / "package.json").read_text())["contributes"]["configuration"]
    enum = conf["properties"]["livekv.strategy"]["enum"]
    ts = re.search(r"STRATEGIES = \[(.*?)\]", (VSCODE / "src" / "requests.ts").read_text()).group(1)
    assert enum == list(STRATEGIES) == re.findall(r"'([^']+)'", ts)
