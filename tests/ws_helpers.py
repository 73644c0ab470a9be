"""What the websocket tests share: the server on its own thread and loop (BackgroundServer) around
one Worker over the session's engine, a protocol client that keeps every message, and the
engine's own answers to compare with (through that worker: one thread drives the engine)."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from conftest import stdlib_source
from livekv.lsp_server.worker import Worker
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions

HANG = 300  # seconds: a guard against hangs, not a performance bound
LINES = stdlib_source().split("\n")
_i = LINES.index("    def get_matching_blocks(self):") + 19
TEXT = "\n".join(LINES[_i: _i + 30]) + "\n"   # ~350 tokens of difflib.py: real code, no docstring
INSERT_AT = TEXT.split("\n").index("        matching_blocks = []") + 1
NEW_LINE = "        i, j, k = self.find_longest_match("
NUMBERS = "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, "   # the model goes on counting for ~30 tokens
URI = "file:///work/matcher.py"


def rng(l0, c0, l1=None, c1=None) -> dict:
    l1, c1 = (l0, c0) if l1 is None else (l1, c1)
    return {"start": {"line": l0, "character": c0}, "end": {"line": l1, "character": c1}}


@pytest.fixture(scope="module")
def worker(engine):
    w = Worker(lambda: engine)
    yield w
    w.close(timeout=HANG)  # let a running job finish: the next module's worker shares the engine


@pytest.fixture
def serve(worker):
    servers = []

    def start(**opts) -> BackgroundServer:
        servers.append(BackgroundServer(worker, ServeOptions(port=0, **opts)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


async def on_worker(worker, fn):
    return await asyncio.wrap_future(worker.submit(fn))


async def reference(worker, text: str, line: int, col: int, n: int) -> str:
    """The engine's own completion on a freshly opened `text` (col in code points)."""
    def run(eng):
        try:
            return eng.open("file:///reference.py", text).complete(line, col, max_new_tokens=n)
        finally:
            eng.close("file:///reference.py")
    return await on_worker(worker, run)


async def server_texts(worker, uri: str) -> list[str]:
    """The texts of every connection's document `uri`, as the engine holds them."""
    return await on_worker(worker, lambda eng: sorted(d.text for u, d in eng.documents.items()
                                                      if u.endswith(":" + uri)))


class Client:
    """A protocol client that keeps every message it gets, to check their order."""

    def __init__(self, ws):
        self.ws, self.n, self.got = ws, 0, []

    async def send(self, type_: str, id_=None, **fields) -> int | str:
        if id_ is None:
            self.n += 1
            id_ = self.n
        await self.ws.send(json.dumps({"type": type_, "id": id_, **fields}))
        return id_

    async def recv(self) -> dict:
        msg = json.loads(await asyncio.wait_for(self.ws.recv(), HANG))
        self.got.append(msg)
        return msg

    async def reply(self, id_, types=("ok", "done", "stats", "error")) -> dict:
        while True:
            msg = await self.recv()
            if msg["id"] == id_ and msg["type"] in types:
                return msg
            assert not (msg["id"] == id_ and msg["type"] == "error"), msg  # fail now, not at the timeout

    async def call(self, type_: str, **fields) -> dict:
        return await self.reply(await self.send(type_, **fields))

    def tokens(self, id_) -> list[str]:
        return [m["text"] for m in self.got if m["type"] == "token" and m["id"] == id_]


def u16(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


async def long_stream(c: "Client") -> tuple:
    """Open NUMBERS and start a completion that would go on for ~30 tokens: (its id, its first token)."""
    await c.call("open", uri=URI, text=NUMBERS)
    cid = await c.send("complete", uri=URI, line=0, character=len(NUMBERS), maxNewTokens=32)
    return cid, await c.reply(cid, types=("token",))


def http_get(url: str, **headers) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HANG) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:  # closing it lets the server close the connection at once
            return e.code, e.headers, e.read()
