"""One websocket client's session: its send queue, its documents, and the jobs it runs on the worker.

Connection state is split by thread: `streams`/`live` belong to the event loop, `versions` to the
worker (jobs read and write it in arrival order), so neither needs a lock.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from . import ws_protocol as P
from .worker import Ticket

log = logging.getLogger("livekv.ws")


def _jsonable(x):
    return x.item() if hasattr(x, "item") else str(x)  # numpy scalars in stats


class Connection:
    """One client: its send queue, its running completions and (worker-side) its documents."""

    def __init__(self, cid: str, ws: ServerConnection, loop: asyncio.AbstractEventLoop):
        self.cid, self.ws, self.loop = cid, ws, loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.closed = False
        self.streams: dict[Any, Ticket] = {}   # completion id -> its ticket (loop thread only)
        self.live: set[Ticket] = set()         # tickets of jobs not yet answered (loop thread only)
        self.versions: dict[str, int] = {}     # engine uri -> client version (worker thread only)

    def euri(self, uri: str) -> str:
        return f"{self.cid}:{uri}"

    def post(self, msg: dict | None) -> None:
        """Queue a message for this client (loop thread). Never blocks."""
        if msg is not None and not self.closed:
            self.queue.put_nowait(json.dumps(msg, default=_jsonable))

    def post_threadsafe(self, msg: dict | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.post, msg)
        except RuntimeError:  # the loop is gone: the server has stopped, nobody to tell
            pass

    async def send_loop(self) -> None:
        """Drain the queue into the socket: only this task ever waits on this client."""
        try:
            while True:
                await self.ws.send(await self.queue.get())
        except ConnectionClosed:  # the reader sees it too, and cleans up
            pass

    def doc_stats(self, doc, uri: str) -> dict:
        # the client's uri and version, not the engine's (doc.stats counts edits in "edits")
        return dict(doc.stats, uri=uri, version=self.versions.get(self.euri(uri), 0))


# -- jobs: fn(engine, conn, ...) on the worker thread, in arrival order --------------------------
def _doc(engine, conn: Connection, uri: str):
    try:
        return engine.get(conn.euri(uri))
    except KeyError:
        raise P.ProtocolError(P.UNKNOWN_URI,
                              f'document {uri!r} is not open on this connection; send "open" first') from None


def open_job(engine, conn: Connection, id_, uri: str, text: str, version: int, ticket: Ticket):
    if conn.closed:
        return None
    doc = engine.open(conn.euri(uri), text, should_stop=ticket.should_stop)
    conn.versions[conn.euri(uri)] = version
    return {"type": "ok", "id": id_, "version": version, "stats": conn.doc_stats(doc, uri)}


def edit_job(engine, conn: Connection, id_, uri: str, version: int, changes: list):
    if conn.closed:
        return None
    doc = _doc(engine, conn, uri)
    have = conn.versions[conn.euri(uri)]
    if version <= have:
        raise P.ProtocolError(P.BAD_VERSION, f"edit version {version} is not newer than the document's version "
                                             f"{have}; versions must increase with every edit")
    if changes:
        kind, arg = P.resolve_changes(doc.text, changes)
        doc.set_text(arg) if kind == "text" else doc.edit_batch(arg)
    conn.versions[conn.euri(uri)] = version
    return {"type": "ok", "id": id_, "version": version, "stats": conn.doc_stats(doc, uri)}


def close_job(engine, conn: Connection, id_, uri: str):
    _doc(engine, conn, uri)
    engine.close(conn.euri(uri))
    conn.versions.pop(conn.euri(uri), None)
    return {"type": "ok", "id": id_}


def stats_job(engine, conn: Connection, id_, uri: str):
    return {"type": "stats", "id": id_, "stats": conn.doc_stats(_doc(engine, conn, uri), uri)}


def complete_job(engine, conn: Connection, id_, uri: str, line: int, char16: int, n: int, ticket: Ticket):
    doc = _doc(engine, conn, uri)
    if ticket.should_stop():  # cancelled, edited or disconnected while queued: do no model work
        return {"type": "done", "id": id_, "text": "", "cancelled": True, "stats": conn.doc_stats(doc, uri)}
    col = P.column(doc.text, line, char16)
    pieces = []
    for piece in doc.stream(line, col, max_new_tokens=n, should_stop=ticket.should_stop):
        pieces.append(piece)
        conn.post_threadsafe({"type": "token", "id": id_, "text": piece})
    cancelled = doc.stats["last_completion"].get("stop") == "cancelled"
    return {"type": "done", "id": id_, "text": "".join(pieces), "cancelled": cancelled,
            "stats": conn.doc_stats(doc, uri)}


def close_all(engine, conn: Connection):
    for euri in list(conn.versions):
        engine.close(euri)
    conn.versions.clear()


def reply(id_, fut) -> dict | None:
    """A finished job's future -> its final reply."""
    if fut.cancelled():
        return P.error(id_, P.INTERNAL, "the server is shutting down")
    e = fut.exception()
    if e is None:
        return fut.result()
    if isinstance(e, P.ProtocolError):
        return P.error(id_, e.code, e.message)
    if isinstance(e, ValueError):
        return P.error(id_, P.BAD_RANGE, str(e))
    log.error("request %r failed", id_, exc_info=e)
    return P.error(id_, P.INTERNAL, f"{type(e).__name__}: {e}")
