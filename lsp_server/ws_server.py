"""`livekv serve`: the websocket server that streams completions token by token.

One asyncio loop speaks the protocol (docs/protocol.md) for every connection; the model's one
thread (Worker) does all engine work, in the order messages arrived. Each connection has its own
send queue drained by its own task, so the loop never waits on a client's socket: a client that
reads slowly only delays its own replies. Each connection has its own documents too: engine uris
are "<connection id>:<uri>", closed when the connection ends.

Fairness: connections take turns on the worker, one job each (and those behind it that end at
once), so a client with many requests queued delays another's by one job of model work; a newer
completion for a document cancels that connection's older ones (they answer cancelled); past
--max-queued complete and stats requests waiting (cancelled ones do not count), a connection's
next ones get a busy error. Edits, opens and closes are never refused, nor counted.

With --demo the same port serves the browser demo (editor-clients/web/) over plain HTTP, so the
page's origin is the server's own and is allowed without --allow-origin. `serve_connection`
speaks the protocol over any transport that looks like a websockets connection; under Ray Serve
(ray_replica.py) each replica runs one WsServer that is never started, fed the connections Ray's
proxy hands it.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import signal
import threading

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import ws_protocol as P
from . import ws_session as S
from livekv.incremental.shared import SharedContexts
from .options import ServeOptions
from .worker import Worker
from .ws_http import DEMO_PAGE, LOOPBACK, allowed_origins, check_request, load_demo  # noqa: F401 (re-exported)

log = logging.getLogger("livekv.ws")

AUTH_TIMEOUT_S = 30     # with --token: how long a new connection may wait before its hello


class WsServer:
    """The protocol on one asyncio loop; model work goes to `worker` (whose engine it shares)."""

    def __init__(self, worker: Worker, opts: ServeOptions, replica: str | None = None):
        self.worker, self.opts, self.replica = worker, opts, replica
        self.port = opts.port
        self._ids = itertools.count(1)
        self._server = None
        self._demo = load_demo(opts.demo_file) if opts.demo else None
        self._contexts: SharedContexts | None = None

    def contexts(self, engine) -> SharedContexts:
        """The context groups every connection shares, and the server's one budget (worker
        thread: the first job that needs them makes them, for the engine it runs on)."""
        if self._contexts is None or self._contexts.engine is not engine:
            self._contexts = SharedContexts(engine, self.opts.max_cache_tokens)
        return self._contexts

    def batching(self) -> dict:
        """The worker's batched steps so far: how many, the passes they ran, the widest, `ahead`."""
        sched = self.worker.scheduler
        if sched is None:
            return dict(steps=0, passes=0, widest=0, ahead=0)
        return dict(steps=sched.steps, passes=sched.passes, widest=sched.widest, ahead=sched.ahead_steps)

    async def start(self) -> None:
        # The transport's hard limit closes the connection (1009); below it, messages over
        # max_message_bytes are answered with a too_large error and the connection lives on.
        hard = 4 * self.opts.max_message_bytes
        self._server = await serve(self.serve_connection, self.opts.host, self.opts.port, max_size=hard,
                                   process_request=lambda c, r: check_request(c, r, self._demo, self.allowed_origins()))
        self.port = self._server.sockets[0].getsockname()[1]

    def allowed_origins(self) -> set[str]:
        return allowed_origins(self.opts.host, self.port, self.opts.allow_origin)

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    # -- websocket: one task per connection reads, one task sends ------------------------------
    async def serve_connection(self, ws: ServerConnection) -> None:
        """One client until it goes: `ws` has websockets' recv(decode=False), send, close and
        remote_address, and raises its ConnectionClosed once the client is gone."""
        conn = S.Connection(f"c{next(self._ids)}", ws, asyncio.get_running_loop(), self)
        log.info("%s connected from %s", conn.cid, ws.remote_address)
        sender = asyncio.create_task(conn.send_loop())
        try:
            if self.opts.token is not None and not await self._authenticate(conn):
                return
            while True:
                self._dispatch(conn, await ws.recv(decode=False))
        except ConnectionClosed:
            pass
        finally:
            conn.closed = True
            for t in conn.live:
                t.cancel()
            self.worker.submit(S.close_all, conn, owner=conn.cid)
            sender.cancel()
            log.info("%s disconnected", conn.cid)

    async def _authenticate(self, conn: S.Connection) -> bool:
        """The first message must be {"type": "hello", "id", "token"}; else error and close (1008)."""
        try:
            raw = await asyncio.wait_for(conn.ws.recv(decode=False), AUTH_TIMEOUT_S)
            msg = P.parse(raw, self.opts.max_message_bytes)
        except P.ProtocolError as e:
            msg = {"id": getattr(e, "id", None)}
        except TimeoutError:  # a silent client must not hold a connection open without the token
            msg = {}
        token = msg.get("token")
        if msg.get("type") == "hello" and isinstance(token, str) and hmac.compare_digest(
                token.encode(), self.opts.token.encode()):
            self._dispatch(conn, raw)
            return True
        why = ("wrong token" if msg.get("type") == "hello"
               else 'the first message must be {"type": "hello", "token": ...}')
        log.warning("%s refused: %s", conn.cid, why)
        await conn.ws.send(json.dumps(P.error(msg.get("id"), P.UNAUTHORIZED, f"{why}: this server needs the "
                                              "token it was started with (--token); closing the connection")))
        await conn.ws.close(1008, f"unauthorized: {why}"[:120])
        return False

    def _dispatch(self, conn: S.Connection, raw: bytes) -> None:
        """Handle one message without waiting: reply now, or submit a job whose reply follows."""
        try:
            msg = P.parse(raw, self.opts.max_message_bytes)
        except P.ProtocolError as e:
            conn.post(P.error(getattr(e, "id", None), e.code, e.message))
            return
        try:
            getattr(self, "_on_" + msg["type"])(conn, msg, msg["id"])
        except P.ProtocolError as e:
            conn.post(P.error(msg["id"], e.code, e.message))
        except Exception as e:  # a bug here must not end the connection
            log.exception("%s: %s request %r failed", conn.cid, msg["type"], msg["id"])
            conn.post(P.error(msg["id"], P.INTERNAL, f"{type(e).__name__}: {e}"))

    def _submit(self, conn: S.Connection, msg: dict, fn, *args, ticket=None, stream=False, capped=False) -> None:
        id_ = msg["id"]
        if capped:
            if (n := conn.waiting()) >= self.opts.max_queued:
                raise P.ProtocolError(P.BUSY, f"{n} complete/stats requests of this connection are waiting for the "
                                              f"model (--max-queued {self.opts.max_queued}); wait for their answers or "
                                              "cancel some")
            conn.capped[id_] = ticket
        if ticket is not None:
            conn.live.add(ticket)
            if stream:
                conn.streams[id_] = ticket

        def answered(msg):  # on the loop thread, after any token messages the job posted
            if capped:
                conn.capped.pop(id_, None)
            if ticket is not None:
                conn.live.discard(ticket)
                if stream:
                    conn.streams.pop(id_, None)
            conn.post(msg)

        def done(fut):  # on the worker thread
            try:
                conn.loop.call_soon_threadsafe(answered, S.reply(msg, fut))
            except RuntimeError:  # the loop has closed: the server stopped, nobody to answer
                pass

        self.worker.submit(fn, conn, id_, *args, ticket=ticket, owner=conn.cid).add_done_callback(done)

    def _on_hello(self, conn, msg, id_):
        ok = {"type": "ok", "id": id_, "server": "livekv", "protocol": P.PROTOCOL_VERSION,
              "columns": "utf-16", "maxMessageBytes": self.opts.max_message_bytes}
        conn.post(ok if self.replica is None else dict(ok, replica=self.replica))

    def _on_open(self, conn, msg, id_):
        uri, text = P.field(msg, "uri", str), P.field(msg, "text", str)
        version = P.field(msg, "version", int, default=0)
        role = P.field(msg, "role", str, default="document")
        if role not in P.ROLES:
            raise P.ProtocolError(P.BAD_REQUEST, f"role must be one of {', '.join(P.ROLES)}, got {role!r}")
        self.worker.bump(conn.euri(uri))  # a completion on the old text is stale now
        ticket = self.worker.ticket()
        self._submit(conn, msg, S.open_job, uri, text, version, ticket, role, ticket=ticket)

    def _on_edit(self, conn, msg, id_):
        uri, version, changes = P.field(msg, "uri", str), P.field(msg, "version", int), P.changes(msg)
        # Cancel this document's running completion now, before the edit reaches the worker:
        # its text is stale, and the edit must not wait behind it.
        self.worker.bump(conn.euri(uri))
        self._submit(conn, msg, S.edit_job, uri, version, changes)

    def _on_close(self, conn, msg, id_):
        uri = P.field(msg, "uri", str)
        self.worker.bump(conn.euri(uri))
        self._submit(conn, msg, S.close_job, uri)

    def _on_stats(self, conn, msg, id_):
        self._submit(conn, msg, S.stats_job, P.field(msg, "uri", str), capped=True)

    def _on_complete(self, conn, msg, id_):
        uri = P.field(msg, "uri", str)
        line, char = P.field(msg, "line", int, at_least=0), P.field(msg, "character", int, at_least=0)
        n = P.options(msg, "maxNewTokens").get("max_new_tokens")  # None: the engine's default
        if id_ in conn.streams:
            raise P.ProtocolError(P.BAD_REQUEST, f"completion {id_!r} is still streaming; give each request a new id")
        euri = conn.euri(uri)
        for older in conn.streams.values():  # superseded: they answer cancelled, at no model cost if queued
            if older.uri == euri:
                older.cancel()
        ticket = self.worker.ticket(euri)
        conn.completion_coming(uri)  # an edit queued before it leaves its tokens to its first pass
        try:
            self._submit(conn, msg, S.complete_job, uri, line, char, n, ticket, ticket=ticket, stream=True, capped=True)
        except P.ProtocolError:
            conn.completion_coming(uri, -1)
            raise

    def _on_cancel(self, conn, msg, id_):
        ticket = conn.streams.get(id_)
        if ticket is not None:
            ticket.cancel()
        conn.post({"type": "ok", "id": id_, "found": ticket is not None})


class BackgroundServer:
    """A WsServer on its own thread and event loop, for tests and for embedding in a program.

        with BackgroundServer(Worker(lambda: engine), ServeOptions(port=0)) as srv:
            ...connect to srv.url...
    """

    def __init__(self, worker: Worker, opts: ServeOptions):
        self.server = WsServer(worker, opts)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="livekv-ws", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def url(self) -> str:
        return f"ws://{self.server.opts.host}:{self.server.port}/"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_ws_server(config, opts: ServeOptions) -> int:
    """`livekv serve`: serve until SIGINT/SIGTERM. Returns the exit code."""
    from livekv.incremental import Engine
    if opts.host not in LOOPBACK and opts.token is None:
        log.warning("listening on %s without --token: anyone who can reach this port can use the model", opts.host)
    if log.getEffectiveLevel() > logging.DEBUG:  # websockets logs every connection at INFO
        logging.getLogger("websockets").setLevel(logging.WARNING)
    worker = Worker(lambda: Engine.from_config(config), batch=opts.batch_decode,  # loads the model on its thread
                    first_passes_first=opts.first_passes_first)

    async def main() -> None:
        server = WsServer(worker, opts)
        await server.start()
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        log.info("livekv serve: ws://%s:%d/ (loading the model; requests wait for it)", host, server.port)
        if opts.demo:
            log.info("demo page: http://%s:%d/%s", host, server.port, "#token=<your token>" if opts.token else "")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await server.stop()

    try:
        asyncio.run(main())
    except OSError as e:  # the port is taken, the host is not ours...
        log.error("cannot listen on %s:%s: %s; choose another --port or --host", opts.host, opts.port, e.strerror or e)
        return 2
    finally:
        worker.close()
    return 0
