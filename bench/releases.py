"""
Fetch two releases of a PyPI package (via pip, cached) and read their .py files.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tokenize
import zipfile
from pathlib import Path

ARCHIVES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".zip")


class ReleaseError(Exception):
    """A release could not be fetched or read; the message says what to do."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "livekv" / "releases"


def _name_version(filename: str) -> tuple[str, str] | None:
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for ext in ARCHIVES[1:]:
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            return (name, version) if name else None
    return None


def find_archive(folder: Path, package: str, version: str) -> Path | None:
    """An already downloaded wheel (preferred) or sdist of package==version in folder."""
    if not folder.is_dir():
        return None
    hits = []
    for p in folder.iterdir():
        nv = _name_version(p.name)
        if nv and normalize(nv[0]) == normalize(package) and nv[1] == version:
            hits.append(p)
    return min(hits, key=lambda p: (not p.name.endswith(".whl"), p.name), default=None)


def _pip_download(package: str, version: str, dest: Path, binary: bool) -> tuple[bool, str]:
    fmt = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", fmt, "--disable-pip-version-check",
           f"{package}=={version}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip() or r.stdout.strip()


def fetch(package: str, version: str, wheel_dir: Path | None = None) -> Path:
    """Path of a wheel or sdist of package==version: from wheel_dir if given (no network),
    else from the cache, else downloaded with pip into the cache."""
    if wheel_dir is not None:
        hit = find_archive(wheel_dir, package, version)
        if hit is None:
            raise ReleaseError(f"no wheel or sdist of {package}=={version} in {wheel_dir}; "
                               f"put one there (pip download --no-deps {package}=={version} -d {wheel_dir}) "
                               f"or drop --wheel-dir to download it")
        return hit
    cache = cache_dir() / normalize(package)
    hit = find_archive(cache, package, version)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory(prefix="livekv-dl-") as tmp:
        ok, log = _pip_download(package, version, Path(tmp), binary=True)
        if not ok:  # no wheel: an sdist has the same .py files
            ok, log2 = _pip_download(package, version, Path(tmp), binary=False)
            log = log2 if not ok else log
        got = [p for p in Path(tmp).iterdir() if p.name.endswith(ARCHIVES)]
        if not ok or not got:
            tail = "\n    ".join(log.splitlines()[-3:])
            raise ReleaseError(f"pip could not download {package}=={version}:\n    {tail}\n"
                               f"check the name and version on https://pypi.org/project/{package}/#history "
                               f"(and that pip can reach the index), or pass --wheel-dir with the files")
        cache.mkdir(parents=True, exist_ok=True)
        for p in got:
            shutil.move(str(p), cache / p.name)
        return cache / got[0].name


def _decode(data: bytes) -> str | None:
    try:  # honour PEP 263 coding cookies and BOMs; keep "\r\n" as it is
        enc, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(enc)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return None


def read_py_files(archive: Path, version: str) -> tuple[dict[str, str], int]:
    """{relative path: text} of the .py files in a wheel or sdist, and how many could not
    be decoded. Paths drop what names the version (the sdist's top folder, a wheel's
    name-VERSION.data) so the same file has the same path in both releases."""
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                raw = {n: z.read(n) for n in z.namelist() if n.endswith(".py")}
        else:
            raw = {}
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    if m.isfile() and m.name.endswith(".py"):
                        raw[m.name] = t.extractfile(m).read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise ReleaseError(f"cannot read {archive}: {e}; delete it (a partial download?) and rerun") from e
    sdist = not archive.name.endswith(".whl")
    files, bad = {}, 0
    for name, data in raw.items():
        parts = name.removeprefix("./").split("/")
        if sdist:  # drop "name-VERSION/" and a src-layout "src/" so paths match a wheel's
            parts = parts[1:]
            parts = parts[1:] if parts[:1] == ["src"] else parts
        elif parts and parts[0].endswith(".data"):
            parts[0] = parts[0].replace(f"-{version}", "")
        text = _decode(data)
        if text is None:
            bad += 1
        elif parts:
            files["/".join(parts)] = text
    return files, bad
