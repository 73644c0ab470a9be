"""One websocket client: its send queue, its session (documents, versions, what it was shown) and
the jobs it runs on the worker.

Connection state is split by thread: `streams`/`live` belong to the event loop, the session to
the worker (jobs read and write it in arrival order), so neither needs a lock. The session is
the LSP server's (session.py), over this connection's own documents.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from livekv.incremental.host_memory import release_freed_memory

from . import ws_protocol as P
from .connection_docs import ConnectionDocs
from .session import Session, VersionError
from .worker import Ticket

log = logging.getLogger("livekv.ws")


def _jsonable(x):
    return x.item() if hasattr(x, "item") else str(x)  # numpy scalars in stats


class Connection:
    """One client: its send queue, its running completions and (worker-side) its documents."""

    def __init__(self, cid: str, ws: ServerConnection, loop: asyncio.AbstractEventLoop, server=None):
        """server: the WsServer, whose contexts(engine) are shared by every connection and whose
        batching() counts the worker's steps (worker thread)."""
        self.cid, self.ws, self.loop, self.server = cid, ws, loop, server
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.closed = False
        self.streams: dict[Any, Ticket] = {}   # completion id -> its ticket (loop thread only)
        self.live: set[Ticket] = set()         # tickets of jobs not yet answered (loop thread only)
        self.capped: dict[Any, Ticket | None] = {}  # complete/stats ids not yet answered -> ticket (loop thread)
        self._session: Session | None = None   # worker thread only
        self._coming: Counter = Counter()      # uri -> completions submitted, not started (both threads)
        self._coming_lock = threading.Lock()

    def waiting(self) -> int:
        """Complete and stats requests still to be answered that have work to do (a cancelled or
        superseded completion answers at no cost: it does not count)."""
        return sum(t is None or not t.should_stop() for t in self.capped.values())

    def completion_coming(self, uri: str, n: int = 1) -> None:
        """A completion for uri was submitted (n 1, loop thread) or has started (n -1, worker)."""
        with self._coming_lock:
            self._coming[uri] += n

    def completion_waiting(self, uri: str) -> bool:
        with self._coming_lock:
            return self._coming[uri] > 0

    def euri(self, uri: str) -> str:
        """The engine's name of this connection's document uri."""
        return f"{self.cid}:{uri}"

    def session(self, engine) -> Session:
        """This connection's session (worker thread; made by its first job)."""
        if self._session is None or self._session.docs.engine is not engine:
            docs = ConnectionDocs(engine, engine.config.strategy, self.server.contexts(engine), prefix=self.euri(""))
            self._session = Session(docs, encoding="utf-16")
        return self._session

    def stats(self, engine, uri: str) -> dict:
        # the client's uri and version, not the engine's (doc.stats counts edits in "edits")
        st = self.session(engine).stats(uri)
        st["version"] = st.pop("client_version")
        st["workspace"]["batch"] = self.server.batching()
        return st

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



# -- jobs: fn(engine, conn, ...) on the worker thread, in arrival order. Those that run the model
# are steppers (generators, incremental/batch.py): the worker batches their passes with other
# connections' (an open's or an edit's encode chunk by chunk, a completion step by step).
def open_job(engine, conn: Connection, id_, uri: str, text: str, version: int, ticket: Ticket, role: str):
    if conn.closed:
        return None
    s = conn.session(engine)
    s.open(uri, text, version, settle=False, role=role)
    yield from s.docs.settling(uri, ticket.should_stop)
    return warned(s, {"type": "ok", "id": id_, "version": version, "stats": conn.stats(engine, uri)})


def edit_job(engine, conn: Connection, id_, uri: str, version: int, changes: list):
    if conn.closed:
        return None
    s = conn.session(engine)
    yield from s.docs.contexts_settling()  # what the budget evicted comes back first
    try:
        s.change(uri, version, changes, settle=False)
    except VersionError as e:
        raise P.ProtocolError(P.BAD_VERSION, f"edit {e}; versions must increase with every edit") from None
    if not conn.completion_waiting(uri):  # else its new tokens ride in the completion's first pass
        yield from s.docs.settling(uri, edit=True)
    return warned(s, {"type": "ok", "id": id_, "version": version, "stats": conn.stats(engine, uri)})


def warned(session: Session, reply: dict) -> dict:
    """An ok reply, with `warning` when the text had to be altered to be stored (lone surrogates)."""
    return dict(reply, warning=session.warning) if session.warning else reply


def close_job(engine, conn: Connection, id_, uri: str):
    conn.session(engine).close(uri)
    return {"type": "ok", "id": id_}


def stats_job(engine, conn: Connection, id_, uri: str):
    return {"type": "stats", "id": id_, "stats": conn.stats(engine, uri)}


def complete_job(engine, conn: Connection, id_, uri: str, line: int, char16: int, n: int, ticket: Ticket):
    conn.completion_coming(uri, -1)
    pieces = []

    def piece(text: str) -> None:
        pieces.append(text)
        conn.post_threadsafe({"type": "token", "id": id_, "text": text})
    if conn.session(engine).docs.is_context(uri):
        raise P.ProtocolError(P.BAD_REQUEST, f"{uri} was opened as a context file: completions run in this "
                                             "connection's documents; open it without role to complete in it")
    yield from conn.session(engine).docs.contexts_settling(ticket.should_stop)
    # cancelled, edited or disconnected while queued: no model work (answer None)
    answer = yield from conn.session(engine).completing(uri, line, char16, should_stop=ticket.should_stop,
                                                        on_piece=piece, max_new_tokens=n)
    return {"type": "done", "id": id_, "text": "".join(pieces), "cancelled": answer is None or answer.stop == "cancelled",
            "stats": conn.stats(engine, uri)}


def close_all(engine, conn: Connection):
    if conn._session is not None:
        conn._session.docs.clear()
        release_freed_memory()


def reply(msg: dict, fut) -> dict | None:
    """A finished job's future -> the final reply to request `msg`."""
    id_ = msg["id"]
    if fut.cancelled():
        return P.error(id_, P.INTERNAL, "the server is shutting down")
    e = fut.exception()
    if e is None:
        return fut.result()
    if isinstance(e, P.ProtocolError):
        return P.error(id_, e.code, e.message)
    if isinstance(e, KeyError):  # Session: the document is not open
        # the uri lets a client that lost its connection (or its replica) re-open it and retry
        return P.error(id_, P.UNKNOWN_URI, f'{e.args[0]} on this connection; send "open" with its text first',
                       uri=msg.get("uri"))
    if isinstance(e, ValueError):
        return P.error(id_, P.BAD_RANGE, str(e))
    log.error("request %r failed", id_, exc_info=e)
    return P.error(id_, P.INTERNAL, f"{type(e).__name__}: {e}")
