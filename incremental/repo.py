"""The workspace files a Python file imports: the context groups worth keeping next to it.

Imports come from the file's tree-sitter tree (syntax.py); a module name resolves to a file
inside the workspace folder (a module or a package's __init__.py, also under src/), never to the
standard library or site-packages, which the model has seen anyway.
"""
from __future__ import annotations

from pathlib import Path

from .syntax import SyntaxTree


def _candidates(base: Path, parts: list[str]) -> list[Path]:
    out = []
    for n in range(len(parts), 0, -1):  # "a.b.c" may name a.b's attribute c: try shorter too
        p = base.joinpath(*parts[:n])
        out += [p.with_suffix(".py"), p / "__init__.py"]
    return out


def resolve_module(name: str, file: Path, root: Path) -> Path | None:
    """The workspace file a module name (as written in an import) refers to, or None."""
    root = root.resolve()
    if name.startswith("."):
        level = len(name) - len(name.lstrip("."))
        base = file.resolve().parent
        for _ in range(level - 1):
            base = base.parent
        parts = [p for p in name.lstrip(".").split(".") if p]
        cands = _candidates(base, parts) if parts else [base / "__init__.py"]
    else:
        parts = name.split(".")
        cands = _candidates(root, parts) + _candidates(root / "src", parts)
    for c in cands:
        if c.is_file() and c.resolve() != file.resolve() and root in c.resolve().parents:
            return c.resolve()
    return None


def imported_files(text: str, file: Path, root: Path, limit: int = 16) -> list[Path]:
    """Workspace files imported by a Python source text, in import order, at most `limit`."""
    seen: list[Path] = []
    for name in SyntaxTree(text).imports():
        path = resolve_module(name, file, root)
        if path is not None and path not in seen:
            seen.append(path)
        if len(seen) >= limit:
            break
    return seen
