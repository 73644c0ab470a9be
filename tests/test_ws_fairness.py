"""The websocket server under load and abuse: two clients take turns on the model, a newer
completion supersedes a document's older ones, a connection's queue is capped, and random
garbage between valid requests never costs a valid request its answer (hypothesis)."""
from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.asyncio.client import connect
from websockets.sync.client import connect as connect_sync

from livekv.lsp_server import ws_protocol as P
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions
from ws_helpers import HANG, NUMBERS, TEXT, URI, Client, reference, serve, worker  # noqa: F401


def doc(i: int) -> str:
    return f"file:///work/busy{i}.py"


async def test_two_clients_take_turns(serve, worker):
    """A floods the model with 8 completions (on 8 documents: none supersedes another); B's one
    completion, sent after them all, comes back after at most a few of A's, not after all 8."""
    srv = serve()
    async with connect(srv.url) as wa, connect(srv.url) as wb:
        a, b = Client(wa), Client(wb)
        for i in range(8):
            assert (await a.call("open", uri=doc(i), text=NUMBERS))["type"] == "ok"
        assert (await b.call("open", uri=URI, text=NUMBERS))["type"] == "ok"
        ids = [await a.send("complete", uri=doc(i), line=0, character=len(NUMBERS), maxNewTokens=8) for i in range(8)]
        ib = await b.send("complete", uri=URI, line=0, character=len(NUMBERS), maxNewTokens=8)
        order: list[str] = []

        async def collect(c: Client, wanted, who: str):
            for id_ in wanted:
                r = await c.reply(id_)
                assert r["type"] == "done" and not r["cancelled"] and r["text"], r
                order.append(who)
        await asyncio.gather(collect(a, ids, "a"), collect(b, [ib], "b"))
    before_b = order.index("b")
    assert before_b <= 3, order  # round-robin: one of A's running, one per turn; FIFO would be 8


async def test_a_newer_completion_supersedes_older_ones(serve, worker):
    srv = serve()
    async with connect(srv.url) as ws:
        c = Client(ws)
        await c.call("open", uri=URI, text=NUMBERS)
        ids = [await c.send("complete", uri=URI, line=0, character=len(NUMBERS), maxNewTokens=6) for _ in range(5)]
        answers = await final_answers(c, ids)
    assert [a["cancelled"] for a in answers] == [True] * 4 + [False], answers
    assert answers[-1]["text"] == await reference(worker, NUMBERS, 0, len(NUMBERS), 6) != ""


async def test_a_connection_past_its_cap_is_told_busy(serve, worker):
    srv = serve(max_queued=2)
    async with connect(srv.url) as ws:
        c = Client(ws)
        for i in range(5):
            await c.call("open", uri=doc(i), text=NUMBERS)
        ids = [await c.send("complete", uri=doc(i), line=0, character=len(NUMBERS), maxNewTokens=4) for i in range(5)]
        answers = await final_answers(c, ids)  # a busy error comes at once, before earlier ids' done
        done = [a for a in answers if a["type"] == "done"]
        busy = [a for a in answers if a["type"] == "error"]
        assert 2 <= len(done) <= 3 and all(a["text"] for a in done), answers  # 2 queued (+ 1 running)
        assert busy and all(a["code"] == P.BUSY and "--max-queued 2" in a["message"] for a in busy), answers
        # edits are never refused, and the connection goes on once its queue drains
        assert (await c.call("edit", uri=doc(0), version=1, changes=[{"text": NUMBERS + "13, "}]))["type"] == "ok"
        again = await c.call("complete", uri=doc(0), line=0, character=len(NUMBERS) + 4, maxNewTokens=2)
        assert again["type"] == "done" and again["text"]


async def final_answers(c: Client, ids: list) -> list[dict]:
    """The final message (done or error) of each id, in whatever order they come."""
    got: dict = {}
    while len(got) < len(ids):
        m = await c.recv()
        if m["id"] in ids and m["type"] in ("done", "error"):
            got[m["id"]] = m
    return [got[i] for i in ids]


TYPES = ["hello", "open", "edit", "close", "stats", "complete", "cancel", "nonsense"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = st.fixed_dictionaries({}, optional={
    "uri": st.sampled_from([URI, "file:///fuzz.py", ""]) | st.integers(), "text": st.text(max_size=40) | JSON,
    "version": st.integers(-2, 5) | JSON, "line": st.integers(-1, 4) | JSON, "character": st.integers(-1, 60) | JSON,
    "maxNewTokens": st.integers(-1, 3) | JSON, "changes": st.lists(JSON, max_size=2) | JSON})
REQUEST = st.builds(lambda t, i, f: json.dumps({"type": t, "id": i, **f}), st.sampled_from(TYPES),
                    st.integers(0, 99) | st.none(), FIELDS)
GARBAGE = st.binary(max_size=60) | st.text(max_size=60) | JSON.map(json.dumps) | REQUEST


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(GARBAGE, max_size=6), min_size=1, max_size=4))
def test_garbage_between_valid_requests_never_costs_an_answer(worker, rounds):
    """Random bytes, random JSON and random valid-looking requests, then a valid request: it gets
    its own answer, every time, on the same connection."""
    with BackgroundServer(worker, ServeOptions(port=0, max_message_bytes=4096)) as srv, \
            connect_sync(srv.url, open_timeout=HANG) as ws:
        def answer(id_, types) -> dict:
            while True:
                m = json.loads(ws.recv(timeout=HANG))
                if m.get("id") == id_ and m["type"] in types + ("error",):
                    return m
        ws.send(json.dumps({"type": "open", "id": "probe-open", "uri": URI, "text": TEXT[:400]}))
        assert answer("probe-open", ("ok",))["type"] == "ok"
        for n, garbage in enumerate(rounds):
            for g in garbage:
                ws.send(g)
            ws.send(json.dumps({"type": "hello", "id": f"probe-{n}"}))
            assert answer(f"probe-{n}", ("ok",))["server"] == "livekv"
            ws.send(json.dumps({"type": "stats", "id": f"probe-stats-{n}", "uri": "file:///never-opened.py"}))
            assert answer(f"probe-stats-{n}", ("stats",))["code"] == P.UNKNOWN_URI
