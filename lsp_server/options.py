"""The servers' own settings, beside the engine's Config: one validated dataclass per server.

Each field is a CLI flag of its command (`livekv lsp`, `livekv serve`); LspOptions' `lsp` fields
are also LSP settings. `livekv settings` prints them all, and the settings tables in the docs
are made from them (schema_markdown).
"""
from __future__ import annotations

from dataclasses import dataclass

from livekv.incremental.config import Config
from livekv.incremental.settings import Settings, markdown_table, setting

MAX_CANDIDATES = 5


@dataclass(frozen=True)
class LspOptions(Settings):
    """`livekv lsp`: the language server's own settings; the rest are the engine's Config."""
    tcp: str | None = setting(None, "serve over TCP at HOST:PORT instead of stdio", metavar="HOST:PORT")
    prefetch: bool = setting(True, "after a suggestion, decode the next line while idle, as if it were accepted",
                             lsp=True)
    candidates: int = setting(1, "inline suggestions for an explicit request, from one batched decode",
                              min=1, max=MAX_CANDIDATES, lsp=True)
    repo_context: bool = setting(True, "keep the other open files, and the workspace files the active one "
                                 "imports, cached as context for its completions", lsp=True)
    # 200k tokens of the embedded model's fp32 cache are ~9 GiB (fits 24 GiB)
    max_cache_tokens: int = setting(200_000, "tokens of KV cache for context files; the least recently used "
                                    "file goes first", min=1, lsp=True)
    max_message_bytes: int = setting(64 << 20, "a message whose Content-Length is larger is refused unread, and "
                                     "the server reads on from the next message", min=1024)
    max_queued: int = setting(16, "completions (for different files) the client may have waiting; a newer one "
                                  "cancels the oldest, which answers empty (a newer one for the same file always "
                                  "cancels the older)", min=1)

    def __post_init__(self):
        super().__post_init__()
        if self.tcp is not None:
            host, _, port = self.tcp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"tcp wants HOST:PORT, e.g. 127.0.0.1:2087, got {self.tcp!r}")


@dataclass(frozen=True)
class ServeOptions(Settings):
    """`livekv serve`: the websocket server's own settings (docs/protocol.md)."""
    host: str = setting("127.0.0.1", "the address to bind; anything but loopback logs a warning without --token")
    port: int = setting(8765, "the port (0: any free one, printed at start)", min=0, max=65535)
    token: str | None = setting(None, "a secret clients must send in their first message (hello)")
    allow_origin: list[str] = setting([], "a browser Origin to accept besides the server's own; repeatable; "
                                          "* accepts any", metavar="ORIGIN")
    max_message_bytes: int = setting(4 << 20, "larger messages get a too_large error (the connection lives on); "
                                     "messages over 4x this close it", min=1024)
    max_queued: int = setting(16, "complete and stats requests one connection may have waiting; beyond it "
                                  "they get a busy error (edits, opens and closes are always taken, and not counted)",
                              min=1)
    max_cache_tokens: int = setting(200_000, "tokens of KV cache for every connection together: their documents, "
                                    "and each context file once however many share it; past it the least recently "
                                    "used file's cache goes (context files first, a connection's active document "
                                    "last)", min=1)
    batch_decode: bool = setting(True, "run the forward passes of every connection's completions and encodes "
                                       "together, one pass of the weights per step for all of them; off: one job "
                                       "at a time, connections taking turns")
    first_passes_first: bool = setting(False, "with --batch-decode: the first pass of a completion that has just "
                                              "arrived runs in a step of its own, ahead of the others' next decode "
                                              "step: a sooner first token, for fewer completions per second "
                                              "(README, Many editors)")
    demo: bool = setting(False, "also serve the browser demo page at /")
    demo_file: str | None = setting(None, "the file the demo opens (default: the stdlib's bisect.py)", metavar="FILE")
    replicas: int = setting(0, "run under Ray Serve with this many replicas, each with its own model, on --host and "
                               "--port (needs pip install 'livekv[serve]'); 0: this one process", min=0)
    ray_address: str | None = setting(None, "with --replicas: the Ray cluster to join (auto, or ray://HOST:PORT); "
                                            "default: start one on this machine", metavar="ADDRESS")
    replica_connections: int = setting(256, "with --replicas: websocket connections one replica takes; past it new "
                                            "ones go to the next replica on the hash ring", min=1)
    replica_cpus: float = setting(1.0, "with --replicas: CPUs Ray reserves for each replica", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty: leave it out to accept clients without a token")
        if self.replicas and self.port == 0:
            raise ValueError("replicas needs a fixed port: Ray Serve's proxy cannot pick a free one (port 0)")
        if self.ray_address is not None and not self.replicas:
            raise ValueError("ray_address only matters with replicas: give --replicas N too")


def split_settings(changes: dict) -> tuple[dict, dict]:
    """(Config changes, LspOptions changes) of parse_settings' result."""
    own = {f.name for f in LspOptions.lsp_fields().values()}
    return {k: v for k, v in changes.items() if k not in own}, {k: v for k, v in changes.items() if k in own}


def lsp_setting_names() -> list[str]:
    return sorted([*Config.lsp_fields(), *LspOptions.lsp_fields()])


def schema() -> dict:
    """Every setting of every layer, by the command that takes it (`livekv settings --json`)."""
    return {"engine": Config.schema(), "lsp": LspOptions.schema(), "serve": ServeOptions.schema()}


def schema_markdown(which: str) -> str:
    """The documentation tables: "lsp" (editor settings), "serve" (websocket server flags)."""
    if which == "lsp":
        return markdown_table(Config.schema() + LspOptions.schema(), "lsp")
    return markdown_table(ServeOptions.schema(), "flag")
