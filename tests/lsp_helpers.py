"""Shared by the LSP tests: how to start the real server, and a client-side model of its text."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 6  # maxNewTokens for completions the tests compare with the engine


def server_command(*args: str) -> list[str]:
    # --encode-chunk 128: a small file's first encode takes several chunks, so progress reports
    return [sys.executable, "-m", "lsp_server.cli", "lsp", "--max-new-tokens", "8", "--encode-chunk", "128", *args]


def server_env() -> dict[str, str]:
    # One torch thread each for the server and the test process: on 2 shared cores, two
    # processes with two threads each make every step 5-10x slower. Offline: a missing model
    # must fail at once instead of trying the hub.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
                TOKENIZERS_PARALLELISM="false")


class one_thread:
    """Run the test process's engine on one torch thread (restored afterwards)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply(text: str, start: tuple[int, int], end: tuple[int, int], new: str) -> str:
    """Replace (line, column)..(line, column), columns in code points; lines end at \\n."""
    lines = text.split("\n")
    a = sum(len(s) + 1 for s in lines[: start[0]]) + start[1]
    b = sum(len(s) + 1 for s in lines[: end[0]]) + end[1]
    return text[:a] + new + text[b:]


def expected_completion(engine, text: str, line: int, col: int, n: int = MAX_NEW) -> str:
    """What the engine completes on text, opened fresh (pie and full are then identical)."""
    with one_thread():
        doc = engine.open("file:///expected.py", text)
        try:
            return doc.complete(line, col, max_new_tokens=n)
        finally:
            engine.close("file:///expected.py")


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class RawClient:
    """JSON-RPC over raw bytes (a pipe or a socket), to send what no client library would:
    garbage, or several messages in one write. Every byte read must be LSP framing."""

    def __init__(self, write, stream):
        self.write, self.stream = write, stream
        self.replies: dict = {}
        self.junk: list[bytes] = []
        self.arrived = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while header := self.stream.readline():
            if not header.startswith(b"Content-Length: "):
                self.junk.append(header)
                continue
            n = int(header.split(b":")[1])
            while (h := self.stream.readline()) not in (b"\r\n", b""):
                if not h.startswith(b"Content-Type: "):
                    self.junk.append(h)
            msg = json.loads(self.stream.read(n))
            if "id" in msg and "method" not in msg:
                with self.arrived:
                    self.replies[msg["id"]] = msg
                    self.arrived.notify_all()

    def send(self, *messages) -> None:
        """Messages (dicts, or raw bytes sent as they are) in one write."""
        self.write(b"".join(m if isinstance(m, bytes) else frame(m) for m in messages))

    def request(self, id_, method: str, params=None) -> dict:
        return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}

    def notification(self, method: str, params=None) -> dict:
        return {"jsonrpc": "2.0", "method": method, "params": params}

    def reply(self, id_, timeout: float = 120) -> dict:
        with self.arrived:
            assert self.arrived.wait_for(lambda: id_ in self.replies, timeout), f"no reply to request {id_}"
            return self.replies[id_]

    def initialize(self) -> None:
        self.send(self.request(0, "initialize", {"capabilities": {}}))
        assert "capabilities" in self.reply(0)["result"]
        self.send(self.notification("initialized", {}))

    def open(self, uri: str, text: str) -> None:
        self.send(self.notification("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}}))

    def completion(self, id_, uri: str, line: int, character: int) -> dict:
        return self.request(id_, "textDocument/completion",
                            {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})

    def shutdown(self) -> None:
        self.send(self.request("bye", "shutdown"))
        assert self.reply("bye")["result"] is None
        self.send(self.notification("exit"))
