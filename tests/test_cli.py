"""Every `livekv bench NAME` entry point takes its arguments from the CLI (a --help answers)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from livekv.lsp_server.cli import BENCHES, main


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_bench_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    assert f"livekv bench {name}" in capsys.readouterr().out


def test_an_unknown_bench_names_the_choices(capsys):
    assert main(["bench", "nope"]) == 2
    assert "replay" in capsys.readouterr().err


ROW = re.compile(r"^\s*(pie|full)\s+edit\s+([\d.]+) ms\s+encoded\s+(\d+)\s+rotated\s+(\d+)\s+stale\s+(\d+)\s+"
                 r"first token\s+([\d.]+) ms\s+-> (.*)$")


def test_the_readme_demo_runs_and_reports_what_it_measured():
    """`livekv demo`, the README's first command after setup: PIE next to a full re-encode. Its
    summary must say what its own rows show (no timing is asserted: that is the bench's job)."""
    from lsp_helpers import ROOT, server_env
    out = subprocess.run([sys.executable, "-m", "livekv", "demo"], cwd=ROOT, env=server_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m[1]: m for m in (ROW.match(ln) for ln in out.stdout.splitlines()) if m}
    assert set(rows) == {"pie", "full"}, out.stdout
    tokens = int(re.search(r"opened .*: (\d+) tokens", out.stderr)[1])
    pie, full = ({"edit": float(r[2]), "encoded": int(r[3]), "rotated": int(r[4]), "stale": int(r[5]),
                  "ttft": float(r[6]), "text": ast.literal_eval(r[7])} for r in (rows["pie"], rows["full"]))
    # full re-encodes everything and moves nothing; pie encodes the new line, rotates the rest
    assert full["encoded"] > tokens and full["rotated"] == 0 == full["stale"]
    assert 0 < pie["encoded"] < 32 and pie["rotated"] > tokens // 4 and pie["stale"] == pie["rotated"]
    m = re.search(r"pie: edit \+ first token ([\d.]+)x (faster|slower) than full re-encode; completions "
                  r"(agree|differ)\.", out.stdout)
    assert m, out.stdout
    ratio = (full["edit"] + full["ttft"]) / (pie["edit"] + pie["ttft"])
    said = float(m[1]) if m[2] == "faster" else 1 / float(m[1])
    assert (m[2] == "faster") == (ratio >= 1) and abs(said - ratio) <= 0.06 * ratio + 0.05, (ratio, m[0])
    assert (m[3] == "agree") == (pie["text"] == full["text"])


def test_livekv_runs_without_ray_and_replicas_name_the_extra():
    """Ray Serve is an optional extra: nothing imports it but `livekv serve --replicas`, which,
    without it, says what to install (here Ray is hidden from a fresh interpreter)."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import livekv, livekv.lsp_server.cli as cli, livekv.lsp_server.ws_server\n"
            "assert not [m for m in sys.modules if m.startswith('ray.')]\n"
            "sys.exit(cli.main(['serve', '--replicas', '2', '--port', '8799']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'livekv[serve]'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, words", [(["--replicas", "2", "--port", "0"], "fixed port"),
                                         (["--ray-address", "auto"], "give --replicas"),
                                         (["--replicas", "-1"], "at least 0")])
def test_replica_settings_say_what_is_wrong(args, words, capsys):
    assert main(["serve", *args]) == 2
    assert words in capsys.readouterr().err
