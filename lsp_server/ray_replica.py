"""One replica of `livekv serve --replicas N`: a Ray Serve deployment whose every replica holds its
own model (a Worker) and its own WsServer, fed the websocket connections Ray's proxy routes to it.

Nothing of the protocol lives here: Ray's proxy hands over a Starlette WebSocket, `AsgiSocket`
gives it the surface WsServer.serve_connection speaks through (websockets' recv/send/close), and
the browser origin and demo-page rules are ws_http's, as in the one-process server. Which replica
a connection reaches is Ray's consistent-hash request router's choice, keyed by the
X-Livekv-Workspace header (ray_serve.py sets it up).

Imported only under Ray (it needs the `serve` extra).
"""

import logging
import os

from fastapi import FastAPI, Request, Response, WebSocket
from ray import serve
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from livekv.incremental import Engine

from . import ws_protocol as P
from .options import ServeOptions
from .worker import Worker
from .ws_http import allowed_origins, http_answer, load_demo, origin_refusal
from .ws_server import WsServer

log = logging.getLogger("livekv.ray")

# Ray Serve reads the name of the header it routes by from this variable, once per process: the
# proxy's must hold it before Ray starts (ray_serve.py sets it for a cluster it starts itself).
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"

# FastAPI's generated API pages would answer on the same port as the demo: not wanted.
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def same_header(a: str, b: str) -> bool:
    """Ray Serve's own comparison: case-insensitive, '-' and '_' alike."""
    return a.lower().replace("-", "_") == b.lower().replace("-", "_")


class AsgiSocket:
    """A Starlette WebSocket as WsServer sees a websockets connection: recv, send, close and
    remote_address, raising ConnectionClosed once the client (or Ray's proxy) is gone."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.remote_address = (ws.client.host, ws.client.port) if ws.client else None

    async def recv(self, decode: bool = False) -> bytes | str:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise ConnectionClosed(Close(msg.get("code", 1000), msg.get("reason") or ""), None)
        return msg["bytes"] if msg.get("bytes") is not None else msg["text"]

    async def send(self, text: str) -> None:
        try:
            await self.ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):  # RuntimeError: Starlette, after a close
            raise ConnectionClosed(None, None) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


@serve.deployment
@serve.ingress(app)
class LivekvReplica:
    """The websocket server of one replica, over its own model."""

    def __init__(self, config, opts: ServeOptions):
        routed_by = os.environ.get(SESSION_HEADER_ENV, "x-session-id")
        if not same_header(routed_by, P.WORKSPACE_HEADER):  # else a workspace would land on any replica
            raise RuntimeError(f"Ray Serve routes by the header {routed_by!r}, not {P.WORKSPACE_HEADER}: start the "
                               f"Ray cluster with {SESSION_HEADER_ENV}={P.WORKSPACE_HEADER.lower()} in its "
                               "environment (on every node)")
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.worker = Worker(lambda: Engine.from_config(config), batch=opts.batch_decode,
                         first_passes_first=opts.first_passes_first)
        # Wait for the model: the replica joins the hash ring only once it can serve, and a model
        # that cannot load fails the deployment, saying why, instead of every request.
        self.worker.submit(lambda engine: None).result()
        self.server = WsServer(self.worker, opts, replica=self.replica)
        self.allowed = allowed_origins(opts.host, opts.port, opts.allow_origin)
        self.demo = load_demo(opts.demo_file) if opts.demo else None
        log.info("replica %s ready", self.replica)

    @app.websocket("/")
    async def connect(self, websocket: WebSocket) -> None:
        why = origin_refusal(websocket.headers.get("origin"), self.allowed)
        if why is not None:  # closed before the handshake: the client gets HTTP 403
            await websocket.close(1008, why[:120])
            return
        await websocket.accept()
        await self.server.serve_connection(AsgiSocket(websocket))

    @app.get("/{path:path}")
    async def page(self, path: str, request: Request) -> Response:
        status, body, headers = http_answer("/" + path, request.headers.get("host"), self.demo, self.allowed)
        return Response(body, status_code=status, headers=headers,
                        media_type=None if "Content-Type" in headers else "text/plain; charset=utf-8")

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
