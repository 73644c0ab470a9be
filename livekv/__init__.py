"""livekv: a live KV cache of the files you edit, for next-line code completions that survive
edits anywhere in the file (PIE).

    from livekv import Engine
    eng = Engine.load()                          # the embedded SmolLM2-135M, offline
    doc = eng.open("file:///pkg/mod.py", text)   # encodes the file once
    doc.edit((10, 4), (10, 9), "new_name")       # (line, column) start, end, replacement
    doc.complete(42, 8)                          # the rest of the line at (line, column)

Subpackages: livekv.incremental (the engine), livekv.kernels (key re-rotation), livekv.lsp_server
(the LSP and websocket servers, the CLI), livekv.bench (benchmarks).
"""
import sys
from importlib import metadata
from pathlib import Path

# A checkout's root holds the subpackages' folders (kernels/, incremental/) under their short
# names. Where it is on sys.path (`python -c` or a script run from the root), they shadow installed
# packages of the same names: transformers imports Hugging Face's `kernels` and would get ours.
# The installed livekv never needs the root on the path, so it leaves before anything else loads.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "rerotate_triton.py").is_file():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _checkout]

try:
    __version__ = metadata.version("livekv")  # pyproject.toml is the one place it is written
except metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["Config", "Document", "Engine", "__version__"]


def __getattr__(name: str):
    # the engine imports torch: `python -m livekv --help` should not wait for it
    if name in ("Config", "Document", "Engine"):
        from . import incremental
        return getattr(incremental, name)
    raise AttributeError(f"module 'livekv' has no attribute {name!r}")
