"""The wheel, as a user installs it: built from the repository, it holds one import package,
livekv, and a fresh virtual environment that has it (not editable) completes a real file and
serves the browser demo, with the repository nowhere on its path.

The fresh environment borrows the test environment's dependencies (torch, transformers, the
model wheel) through a .pth line instead of downloading them again; livekv itself comes only
from the wheel."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from lsp_helpers import EXACT, ROOT, expected_completion, server_env

SKIP = {".git", ".venv", "node_modules", "build", "out", "__pycache__", ".pytest_cache", ".hypothesis"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy of the sources: a build/ folder left in the checkout by an older
    # layout would otherwise leak stale modules into the wheel
    src = tmp_path_factory.mktemp("src") / "livekv"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                   check=True, timeout=600)
    [whl] = dist.glob("livekv-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, timeout=300)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def run_env() -> dict:
    env = server_env()
    env.pop("PYTHONPATH", None)  # the repository must not be importable
    return env


def test_the_wheel_holds_only_livekv(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"livekv", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for sub in ("incremental", "kernels", "lsp_server", "bench", "web"):
        assert f"livekv/{sub}/__init__.py" in names
    assert {"livekv/web/index.html", "livekv/web/client.js", "livekv/web/demo.js", "livekv/__main__.py"} <= set(names)


def test_the_installed_wheel_completes_a_real_file(fresh, engine, tmp_path):
    import bisect
    text = Path(bisect.__file__).read_text(encoding="utf-8")
    line = text.split("\n").index("def insort_right(a, x, lo=0, hi=None, *, key=None):") + 1
    where = subprocess.run([str(fresh / "bin" / "python"), "-c", "import livekv, livekv.incremental as i; "
                            "print(livekv.__file__, i.__file__, livekv.__version__)"],
                           cwd=tmp_path, env=run_env(), capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(fresh)) for p in where[:2]), where
    assert where[2] == "0.1.0"
    out = subprocess.run([str(fresh / "bin" / "livekv"), "complete", bisect.__file__, str(line), "0",
                          "--max-new-tokens", "8", *EXACT], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    want = expected_completion(engine, text, line, 0, 8)
    assert want and out.stdout == want + "\n"


def test_the_installed_wheel_serves_the_demo_page(fresh, tmp_path):
    proc = subprocess.Popen([str(fresh / "bin" / "livekv"), "serve", "--demo", "--port", "0"], cwd=tmp_path,
                            env=run_env(), stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:  # the server prints its address once it listens
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the server did not say where it listens"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        wheel_page = (ROOT / "editor-clients" / "web" / "index.html").read_text(encoding="utf-8")
        assert page == wheel_page and "<html" in page.lower()
        for script in ("client.js", "demo.js"):
            served = urllib.request.urlopen(f"http://127.0.0.1:{port}/{script}", timeout=30).read().decode()
            assert served == (ROOT / "editor-clients" / "web" / script).read_text(encoding="utf-8")
        demo_file = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/demo-file.json", timeout=30).read())
        assert demo_file["text"].startswith('"""') and demo_file["uri"].endswith("bisect.py")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0
