"""Every `livekv bench NAME` entry point takes its arguments from the CLI (a --help answers)."""
from __future__ import annotations

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


def test_the_readme_demo_runs():
    """`livekv demo`, the README's first command after setup: PIE next to a full re-encode."""
    import subprocess
    import sys

    from lsp_helpers import ROOT, server_env
    out = subprocess.run([sys.executable, "-m", "livekv", "demo"], cwd=ROOT, env=server_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    pie = next(ln for ln in lines if ln.strip().startswith("pie   edit"))
    full = next(ln for ln in lines if ln.strip().startswith("full  edit"))
    assert "rotated     0" in full and "encoded     " in pie and "faster than full re-encode" in out.stdout
