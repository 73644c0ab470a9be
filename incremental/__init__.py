"""livekv's engine: a live KV cache of open documents, updated edit by edit (PIE).

    from livekv.incremental import Engine
    eng = Engine.load()                          # the embedded model, offline
    doc = eng.open("file:///pkg/mod.py", text)   # encodes the file once
    doc.edit((10, 4), (10, 9), "new_name")       # (line, column) start, end, replacement
    doc.complete(42, 8)                          # the rest of the line at (line, column)
"""
from .config import STRATEGIES, Config
from .document import Document
from .engine import Engine
from .token_mirror import Splice, TokenMirror

__all__ = ["Config", "Document", "Engine", "STRATEGIES", "Splice", "TokenMirror"]
