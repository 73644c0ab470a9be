"""The websocket server's plain-HTTP side: the browser demo page, and which origins may connect.

Runs before the websocket handshake. Plain HTTP gets the demo (with --demo) or a 404 that says
what this port is; a websocket upgrade from a page of another origin is refused, since any site
the user visits could otherwise drive the model and read the files it is given.
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

DEMO_PAGE = importlib.resources.files("livekv.web") / "index.html"  # package data: a wheel has it too
DEMO_MODULE = "bisect"  # a real, short stdlib file: ~900 tokens, encoded in about a second on a CPU
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The content the demo page may touch: itself and this server. Nothing from the internet.
DEMO_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:")


def load_demo(demo_file: str | None) -> tuple[str, str]:
    """(the page's html, the JSON of the file it opens); ValueError says what is missing."""
    if not DEMO_PAGE.is_file():
        raise ValueError(f"--demo needs the page {DEMO_PAGE}, which is missing: reinstall livekv")
    path = Path(demo_file or importlib.import_module(DEMO_MODULE).__file__)
    try:
        return (DEMO_PAGE.read_text(encoding="utf-8"),
                json.dumps({"uri": path.resolve().as_uri(), "text": path.read_text(encoding="utf-8")}))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the demo file {path}: {e}") from None


def allowed_origins(host: str, port: int, extra) -> set[str]:
    """The server's own origins (every loopback name when it listens on one) plus --allow-origin."""
    hosts = LOOPBACK if host in LOOPBACK else (host,)
    own = {f"http://{'[' + h + ']' if ':' in h else h}:{port}" for h in hosts}
    return own | set(extra)


def check_request(connection, request, demo: tuple[str, str] | None, allowed: set[str]):
    """Before the handshake: plain HTTP gets the demo (or 404); a websocket needs a good Origin.
    Returns the response to send instead of the handshake, or None to go on with it."""
    if "websocket" not in request.headers.get("Upgrade", "").lower():
        return _http(connection, request, demo, allowed)
    origin = request.headers.get("Origin")
    if origin is not None and "*" not in allowed and origin not in allowed:
        log.warning("refused a connection from origin %s", origin)
        return connection.respond(HTTPStatus.FORBIDDEN, f"livekv: origin {origin} is not allowed; start the "
                                                        f"server with --allow-origin {origin} to accept it\n")
    return None


def _http(connection, request, demo, allowed: set[str]):
    path, host = request.path.split("?", 1)[0], request.headers.get("Host")
    if demo is None or path not in ("/", "/index.html", "/demo-file.json"):
        hint = "" if demo else " (start it with --demo for the browser page)"
        return connection.respond(HTTPStatus.NOT_FOUND, f"livekv: this is a websocket server{hint}\n")
    if "*" not in allowed and host not in {urlsplit(o).netloc for o in allowed}:
        # DNS rebinding: a page of another site, resolved to this address, must not read the file
        return connection.respond(HTTPStatus.FORBIDDEN, f"livekv: unexpected Host {host}; open the address "
                                                        "the server printed, or add it with --allow-origin\n")
    html = path != "/demo-file.json"
    resp = connection.respond(HTTPStatus.OK, demo[0] if html else demo[1])
    del resp.headers["Content-Type"]
    resp.headers["Content-Type"] = "text/html; charset=utf-8" if html else "application/json"
    resp.headers["Content-Security-Policy"] = DEMO_CSP
    resp.headers["Cache-Control"] = "no-store"
    return resp
