"""Who may use `livekv serve`: the token a first message must carry, the browser origins it
accepts, and the demo page on the same port (only with --demo, only for its own Host)."""
from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from livekv.lsp_server import ws_protocol as P
from ws_helpers import HANG, URI, Client, http_get, serve, worker  # noqa: F401 (fixtures)


async def test_token_is_required_first(serve):
    srv = serve(token="s3cret")
    for first in ({"type": "hello", "id": 1, "token": "wrong"}, {"type": "stats", "id": 1, "uri": URI}):
        async with connect(srv.url) as ws:
            await ws.send(json.dumps(first))
            m = json.loads(await asyncio.wait_for(ws.recv(), HANG))
            assert m["type"] == "error" and m["code"] == P.UNAUTHORIZED and m["id"] == 1 and "token" in m["message"]
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), HANG)
            assert e.value.rcvd.code == 1008
    async with connect(srv.url) as ws:
        c = Client(ws)
        assert (await c.call("hello", token="s3cret"))["type"] == "ok"
        assert (await c.call("stats", uri=URI))["code"] == P.UNKNOWN_URI   # in, and served


async def test_browser_origins_are_checked(serve):
    srv = serve(allow_origin=["https://ide.example"])
    port = srv.server.port
    for origin in (None, f"http://127.0.0.1:{port}", f"http://localhost:{port}", "https://ide.example"):
        async with connect(srv.url, origin=origin) as ws:
            c = Client(ws)
            assert (await c.call("hello"))["type"] == "ok"
    for origin in ("https://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
        with pytest.raises(InvalidStatus) as e:
            async with connect(srv.url, origin=origin):
                pass
        assert e.value.response.status_code == 403 and b"--allow-origin" in e.value.response.body


def test_http_serves_the_demo_only_with_demo(serve):
    status, _, body = http_get(f"{serve().url.replace('ws:', 'http:')}")
    assert status == 404 and b"--demo" in body
    url = serve(demo=True).url.replace("ws:", "http:")
    status, headers, body = http_get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<textarea" in body
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]   # its scripts: these two, nothing inline
    for script, word in (("client.js", "class LivekvClient"), ("demo.js", "new LivekvClient")):
        status, headers, body = http_get(url + script)
        assert status == 200 and headers["Content-Type"].startswith("text/javascript") and word.encode() in body
    status, headers, body = http_get(url + "demo-file.json")
    f = json.loads(body)
    assert status == 200 and f["uri"].endswith("/bisect.py") and "def bisect_right" in f["text"]
    # a page of another site whose name was made to resolve here (DNS rebinding) reads nothing
    status, _, body = http_get(url + "demo-file.json", Host="evil.example:" + url.rsplit(":", 1)[1].strip("/"))
    assert status == 403 and b"Host" in body
