"""A protocol client that survives its server, as docs/protocol.md ("Failover") asks of clients
of `livekv serve --replicas N` (the browser demo's client.js does the same):

- a connection that breaks is opened again (to `url()`: under Ray Serve, whichever live replica
  the workspace header routes to) and the request it left unanswered is sent again;
- a request answered `unknown_uri` re-opens that document with the client's own text and version,
  then is retried; an edit the re-opened text already holds is answered by that open.

The client's copy of each document is the truth: it applies its own edits (lines.resolve, the
server's converter), so after any failover the server's text is the client's. One request at a
time, which keeps the rules above easy to check.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from livekv.incremental.lines import resolve
from livekv.lsp_server import ws_protocol as P
from ws_helpers import HANG


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FailoverClient:
    """Documents opened and edited through whatever connection is alive."""

    def __init__(self, url: Callable[[], str], workspace: str | None = None):
        self.url = url
        self.headers = {P.WORKSPACE_HEADER: workspace} if workspace is not None else {}
        self.ws: ClientConnection | None = None
        self.docs: dict[str, tuple[str, int]] = {}  # uri -> (text, version): the client's own
        self.n = 0
        self.replicas: list[str | None] = []        # each connection's replica, from hello
        self.reopened: list[tuple[str, int]] = []   # (uri, version) of every re-open

    async def connect(self) -> None:
        """A new connection (retried while the server or its proxy is not there yet) and its hello."""
        deadline = time.monotonic() + HANG
        while True:
            try:
                self.ws = await connect(self.url(), additional_headers=self.headers, open_timeout=HANG)
                break
            except (OSError, InvalidHandshake):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        hello = await self._roundtrip({"type": "hello"})
        assert hello["type"] == "ok", hello
        self.replicas.append(hello.get("replica"))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def _roundtrip(self, msg: dict) -> dict:
        """One request on the current connection: its final reply (a done carries its tokens)."""
        self.n += 1
        msg = dict(msg, id=self.n)
        await self.ws.send(json.dumps(msg))
        tokens = []
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), HANG))
            if reply.get("id") != msg["id"]:
                continue
            if reply["type"] == "token":
                tokens.append(reply["text"])
                continue
            return dict(reply, tokens=tokens) if reply["type"] == "done" else reply

    async def request(self, msg: dict) -> dict:
        """msg's final reply, through reconnects and re-opens."""
        while True:
            try:
                if self.ws is None:
                    await self.connect()
                reply = await self._roundtrip(msg)
                uri = reply.get("uri")  # the server names the document it does not hold
                if reply["type"] != "error" or reply["code"] != P.UNKNOWN_URI or uri not in self.docs:
                    return reply
                text, version = self.docs[uri]
                opened = await self._roundtrip({"type": "open", "uri": uri, "text": text, "version": version})
                self.reopened.append((uri, version))
                if opened["type"] != "ok" or (msg["type"] == "edit" and msg["version"] <= version):
                    return opened
            except ConnectionClosed:  # the server (or its replica) is gone: reconnect, send again
                self.ws = None

    async def open(self, uri: str, text: str, version: int = 0) -> dict:
        self.docs[uri] = (text, version)
        return await self.request({"type": "open", "uri": uri, "text": text, "version": version})

    async def edit(self, uri: str, changes: list[dict]) -> dict:
        text, version = self.docs[uri]
        text, _ = resolve(text, P.changes({"type": "edit", "changes": changes}), "utf-16")
        self.docs[uri] = (text, version + 1)
        return await self.request({"type": "edit", "uri": uri, "version": version + 1, "changes": changes})

    async def complete(self, uri: str, line: int, character: int, n: int = 8) -> dict:
        return await self.request({"type": "complete", "uri": uri, "line": line, "character": character,
                                   "maxNewTokens": n})

    async def stats(self, uri: str) -> dict:
        return await self.request({"type": "stats", "uri": uri})

    def text(self, uri: str) -> str:
        return self.docs[uri][0]
