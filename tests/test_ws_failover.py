"""Failover as a client lives it (docs/protocol.md, "Failover"): its connection breaks, the next one
does not hold its documents (a new connection, or another replica under Ray Serve), a request
about one gets `unknown_uri` naming it, and the client re-opens it with its own text and retries.

Here against the one-process server over a tiny random Llama, with the connection cut at random
points of random edit sequences (hypothesis); tests/test_ray_serve.py kills a real replica.
"""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.asyncio.client import connect

from failover_client import HANG, FailoverClient, sha256
from livekv.incremental.lines import line_starts, to_position
from livekv.lsp_server import ws_protocol as P
from livekv.lsp_server.worker import Worker
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions
from ws_helpers import NUMBERS, URI, Client

START = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n\n" + NUMBERS


@pytest.fixture(scope="module")
def tiny_worker(tiny_engine):
    w = Worker(lambda: tiny_engine)
    yield w
    w.close(timeout=HANG)


async def test_unknown_uri_names_the_document_to_reopen(tiny_worker):
    with BackgroundServer(tiny_worker, ServeOptions(port=0)) as srv:
        async with connect(srv.url) as ws:
            c = Client(ws)
            assert "replica" not in await c.call("hello")   # only replicas under Ray Serve say which they are
            for type_, fields in (("stats", {}), ("complete", {"line": 0, "character": 0}), ("close", {}),
                                  ("edit", {"version": 1, "changes": [{"text": "x"}]})):
                err = await c.reply(await c.send(type_, uri=URI, **fields))
                assert (err["type"], err["code"], err["uri"]) == ("error", P.UNKNOWN_URI, URI), err
                assert '"open"' in err["message"]


def change_at(text: str, at: float, length: float, new: str) -> dict:
    """A change replacing a stretch of text, chosen by fractions of its length (UTF-16 positions)."""
    a = int(at * len(text))
    b = a + int(length * (len(text) - a))
    starts = line_starts(text)
    (l0, c0), (l1, c1) = to_position(starts, text, a, "utf-16"), to_position(starts, text, b, "utf-16")
    return {"range": {"start": {"line": l0, "character": c0}, "end": {"line": l1, "character": c1}}, "text": new}


EDIT = st.tuples(st.just("edit"), st.floats(0, 1), st.floats(0, 0.2),
                 st.text(st.sampled_from("ab_ (:)\n\té😀"), max_size=6))
OPS = st.lists(st.one_of(EDIT, st.just(("drop",)), st.just(("complete",))), max_size=12)


async def walk(url: str, ops: list) -> None:
    c = FailoverClient(lambda: url)
    assert (await c.open(URI, START))["type"] == "ok"
    drop_runs, dropped = 0, False
    for op in ops:
        if op[0] == "drop":
            drop_runs += not dropped
            dropped = True
            if c.ws is not None:
                c.ws.transport.abort()   # as when a replica dies: no close handshake
            continue
        dropped = False
        if op[0] == "edit":
            r = await c.edit(URI, [change_at(c.text(URI), *op[1:])])
            assert r["type"] == "ok" and r["stats"]["text_sha256"] == sha256(c.text(URI)), r
        else:
            lines = c.text(URI).split("\n")
            r = await c.complete(URI, len(lines) - 1, len(lines[-1].encode("utf-16-le")) // 2, n=3)
            assert r["type"] == "done" and "".join(r["tokens"]) == r["text"], r
    st_ = (await c.stats(URI))["stats"]
    assert st_["text_sha256"] == sha256(c.text(URI)) and st_["version"] == c.docs[URI][1]
    # one re-open per break that a request followed (the stats above follows the last one),
    # each at the version the client held then
    assert len(c.reopened) == drop_runs and all(u == URI for u, _ in c.reopened)
    await c.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_no_edit_is_lost_when_the_connection_breaks_anywhere(tiny_worker, ops):
    with BackgroundServer(tiny_worker, ServeOptions(port=0)) as srv:
        asyncio.run(walk(srv.url, ops))
