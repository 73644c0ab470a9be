"""Every `livekv bench NAME` entry point takes its arguments from the CLI (a --help answers)."""
from __future__ import annotations

import pytest

from lsp_server.cli import BENCHES, main


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_bench_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    assert f"livekv bench {name}" in capsys.readouterr().out


def test_an_unknown_bench_names_the_choices(capsys):
    assert main(["bench", "nope"]) == 2
    assert "replay" in capsys.readouterr().err
