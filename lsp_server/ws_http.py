"""The websocket server's plain-HTTP side: the browser demo page, and which origins may connect.

Runs before the websocket handshake. Plain HTTP gets the demo (with --demo) or a 404 that says
what this port is; a websocket upgrade from a page of another origin is refused, since any site
the user visits could otherwise drive the model and read the files it is given. The rules are
plain functions (origin_refusal, http_answer), so the Ray Serve replicas apply the same ones.
"""
from __future__ import annotations

import importlib
import importlib.resources
import json
import logging
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("livekv.ws")

DEMO_ASSETS = importlib.resources.files("livekv.web")  # package data: a wheel has it too
DEMO_PAGE = DEMO_ASSETS / "index.html"
# path -> (the package file, its content type); the file the demo edits is /demo-file.json
DEMO_ROUTES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
               "/client.js": ("client.js", "text/javascript; charset=utf-8"),
               "/demo.js": ("demo.js", "text/javascript; charset=utf-8")}
DEMO_MODULE = "bisect"  # a real, short stdlib file: ~900 tokens, encoded in about a second on a CPU
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The content the demo page may touch: itself and this server. Nothing from the internet.
DEMO_CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:")


def load_demo(demo_file: str | None) -> dict[str, tuple[str, str]]:
    """The demo's routes: path -> (content type, body); ValueError says what is missing."""
    routes = {}
    for path, (name, ctype) in DEMO_ROUTES.items():
        if not (DEMO_ASSETS / name).is_file():
            raise ValueError(f"--demo needs {DEMO_ASSETS / name}, which is missing: reinstall livekv")
        routes[path] = (ctype, (DEMO_ASSETS / name).read_text(encoding="utf-8"))
    path = Path(demo_file or importlib.import_module(DEMO_MODULE).__file__)
    try:
        routes["/demo-file.json"] = ("application/json", json.dumps(
            {"uri": path.resolve().as_uri(), "text": path.read_text(encoding="utf-8")}))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the demo file {path}: {e}") from None
    return routes


def allowed_origins(host: str, port: int, extra) -> set[str]:
    """The server's own origins (every loopback name when it listens on one) plus --allow-origin."""
    hosts = LOOPBACK if host in LOOPBACK else (host,)
    own = {f"http://{'[' + h + ']' if ':' in h else h}:{port}" for h in hosts}
    return own | set(extra)


def origin_refusal(origin: str | None, allowed: set[str]) -> str | None:
    """Why a websocket upgrade with this Origin header is refused, or None to accept it."""
    if origin is None or "*" in allowed or origin in allowed:
        return None
    log.warning("refused a connection from origin %s", origin)
    return f"livekv: origin {origin} is not allowed; start the server with --allow-origin {origin} to accept it\n"


def http_answer(path: str, host: str | None, demo: dict | None,
                allowed: set[str]) -> tuple[HTTPStatus, str, dict[str, str]]:
    """A plain HTTP GET on the websocket port: (status, body, headers): the demo's routes (with
    --demo, only for the server's own Host) or a 404 that says what this port is."""
    path = path.split("?", 1)[0]
    if demo is None or path not in demo:
        hint = "" if demo else " (start it with --demo for the browser page)"
        return HTTPStatus.NOT_FOUND, f"livekv: this is a websocket server{hint}\n", {}
    if "*" not in allowed and host not in {urlsplit(o).netloc for o in allowed}:
        # DNS rebinding: a page of another site, resolved to this address, must not read the file
        return HTTPStatus.FORBIDDEN, (f"livekv: unexpected Host {host}; open the address the server printed, "
                                      "or add it with --allow-origin\n"), {}
    ctype, body = demo[path]
    return HTTPStatus.OK, body, {"Content-Type": ctype, "Content-Security-Policy": DEMO_CSP,
                                 "Cache-Control": "no-store"}


def check_request(connection, request, demo: dict | None, allowed: set[str]):
    """websockets' hook before the handshake: plain HTTP gets http_answer; a websocket needs a
    good Origin. Returns the response to send instead of the handshake, or None to go on with it."""
    if "websocket" not in request.headers.get("Upgrade", "").lower():
        status, body, headers = http_answer(request.path, request.headers.get("Host"), demo, allowed)
        resp = connection.respond(status, body)
        for k, v in headers.items():
            if k in resp.headers:
                del resp.headers[k]
            resp.headers[k] = v
        return resp
    why = origin_refusal(request.headers.get("Origin"), allowed)
    return None if why is None else connection.respond(HTTPStatus.FORBIDDEN, why)
