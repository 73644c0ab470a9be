"""The websocket server (`livekv serve`) end to end: a real websockets client, the real model.

The server runs in-process on its own thread and loop, with its own Worker around the session's
engine (ws_helpers.py). Model work is kept small: ~350-token documents, a few tokens per
completion. Tokens, origins and the demo's HTTP side: test_ws_access.py.
"""
from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from livekv.incremental import Config
from livekv.lsp_server import ws_protocol as P
from ws_helpers import (HANG, INSERT_AT, NEW_LINE, NUMBERS, TEXT, URI, Client, long_stream, on_worker,  # noqa: F401
                        reference, rng, server_texts, serve, u16, worker)

async def test_open_edit_and_stream_a_completion(serve, worker):
    srv = serve()
    async with connect(srv.url) as ws:
        c = Client(ws)
        hello = await c.call("hello")
        assert hello["type"] == "ok" and hello["columns"] == "utf-16"
        opened = await c.call("open", uri=URI, text=TEXT)
        assert opened["type"] == "ok" and opened["stats"]["tokens"] == opened["stats"]["tokens_encoded_last_edit"] > 200
        # a new line in the middle: PIE encodes only it and rotates the keys after it
        change = {"range": rng(INSERT_AT, 0), "text": NEW_LINE + "\n"}
        edited = await c.call("edit", uri=URI, version=1, changes=[change])
        s = edited["stats"]
        assert edited["type"] == "ok" and edited["version"] == 1 and s["version"] == 1 and s["uri"] == URI
        assert 0 < s["tokens_encoded_last_edit"] < 30 and s["keys_rotated_last_edit"] > 100
        assert s["full_reencode_tokens"] == s["tokens"] > opened["stats"]["tokens"]
        final = TEXT.split("\n")
        final.insert(INSERT_AT, NEW_LINE)
        final = "\n".join(final)
        assert await server_texts(worker, URI) == [final]

        cid = await c.send("complete", uri=URI, line=INSERT_AT, character=len(NEW_LINE), maxNewTokens=6)
        done = await c.reply(cid)
        tokens = c.tokens(cid)
        assert done["type"] == "done" and done["cancelled"] is False
        assert len(tokens) >= 2, tokens                       # streamed piece by piece
        assert c.got[-1] is done and all(m["type"] == "token" for m in c.got[-1 - len(tokens):-1])
        assert "".join(tokens) == done["text"] == await reference(worker, final, INSERT_AT, len(NEW_LINE), 6)
        assert done["stats"]["last_completion"]["text"] == done["text"]

        st = await c.call("stats", uri=URI)
        assert st["type"] == "stats" and st["stats"]["completions"] == 1 and st["stats"]["version"] == 1
        assert (await c.call("close", uri=URI))["type"] == "ok"
        assert (await c.call("stats", uri=URI))["code"] == P.UNKNOWN_URI
        assert await server_texts(worker, URI) == []


async def test_columns_are_utf16_code_units(serve, worker):
    srv = serve()
    line1 = '    s = "😀 héllo 😀"'
    async with connect(srv.url) as ws:
        c = Client(ws)
        assert (await c.call("open", uri=URI, text=f"def greet(name):\n{line1}\n"))["type"] == "ok"
        at = u16('    s = "😀 h')
        r = await c.call("edit", uri=URI, version=1, changes=[
            {"range": rng(1, at), "text": "🎉"},                               # between "h" and "é"
            {"range": rng(1, at + 3, 1, at + 4), "text": "e"},                 # "l" -> "e", after "🎉é"
            {"range": rng(2, 0), "text": "    return s + str(name"}])
        assert r["type"] == "ok", r
        want = 'def greet(name):\n    s = "😀 h🎉éelo 😀"\n    return s + str(name'
        assert await server_texts(worker, URI) == [want]
        inside = u16('    s = "') + 1
        bad = await c.call("edit", uri=URI, version=2, changes=[{"range": rng(1, inside), "text": "x"}])
        assert bad["code"] == P.BAD_RANGE and "surrogate" in bad["message"]
        bad = await c.call("edit", uri=URI, version=2, changes=[{"range": rng(1, u16(line1) + 3), "text": "x"}])
        assert bad["code"] == P.BAD_RANGE and "UTF-16" in bad["message"]
        assert await server_texts(worker, URI) == [want]  # failed edits left it alone

        # a completion on a line with emoji: its column is converted too
        line2 = '    return f"{s} 😀 {name'
        text = want.rsplit("\n", 1)[0] + "\n" + line2
        assert (await c.call("open", uri=URI, text=text))["type"] == "ok"
        cid = await c.send("complete", uri=URI, line=2, character=u16(line2), maxNewTokens=4)
        done = await c.reply(cid)
        assert done["type"] == "done" and "".join(c.tokens(cid)) == done["text"]
        assert done["text"] == await reference(worker, text, 2, len(line2), 4)


async def test_cancel_stops_the_stream(serve, worker):
    srv = serve()
    async with connect(srv.url) as ws:
        c = Client(ws)
        cid, first = await long_stream(c)
        await c.send("cancel", id_=cid)           # a cancel carries the id of the completion
        ok = await c.reply(cid, types=("ok",))     # its ok and the completion's done: either order
        done = next((m for m in c.got if m["type"] == "done"), None) or await c.reply(cid, types=("done",))
        assert ok["found"] is True
        assert done["cancelled"] is True and done["stats"]["last_completion"]["stop"] == "cancelled"
        tokens = c.tokens(cid)
        assert tokens[0] == first["text"] and "".join(tokens) == done["text"]
        assert len(tokens) < 20, tokens  # uncancelled it goes on to "20]", ~30 tokens
        # cancelling what is not running is no error; the document still serves completions
        assert (await c.reply(await c.send("cancel", id_=cid), types=("ok",)))["found"] is False
        cid = await c.send("complete", uri=URI, line=0, character=len(NUMBERS), maxNewTokens=3)
        done = await c.reply(cid)
        assert done["cancelled"] is False and "".join(c.tokens(cid)) == done["text"] != ""


async def test_an_edit_during_a_stream_cancels_it_and_is_applied(serve, worker):
    srv = serve()
    async with connect(srv.url) as ws:
        c = Client(ws)
        cid, _ = await long_stream(c)
        eid = await c.send("edit", uri=URI, version=1, changes=[{"range": rng(0, 0, 0, 1), "text": "y"}])
        edited = await c.reply(eid)
        done = next(m for m in c.got if m["type"] == "done")
        assert done["cancelled"] is True and "".join(c.tokens(cid)) == done["text"]
        assert c.got.index(done) < c.got.index(edited) and edited["type"] == "ok"   # applied in order
        text = "y" + NUMBERS[1:]
        assert await server_texts(worker, URI) == [text]
        cid = await c.send("complete", uri=URI, line=0, character=len(text), maxNewTokens=4)
        done = await c.reply(cid)
        assert done["cancelled"] is False
        assert done["text"] == "".join(c.tokens(cid)) == await reference(worker, text, 0, len(text), 4)


async def test_bad_messages_get_errors_and_the_connection_survives(serve, worker):
    srv = serve(max_message_bytes=2048)
    async with connect(srv.url) as ws:
        c = Client(ws)
        await c.call("open", uri=URI, text=TEXT[:1000], version=5)

        async def err(raw, id_=None) -> dict:
            await ws.send(raw)
            while True:
                m = await c.recv()
                if m["type"] == "error" and m["id"] == id_:
                    return m

        def msg(type_, **f) -> str:
            return json.dumps({"type": type_, "id": "x", **f})

        def edit(version, *changes) -> str:
            return msg("edit", uri=URI, version=version, changes=list(changes))

        nope = "file:///nope.py"
        cases = [  # (message, the id its error echoes, code, words the message must hold)
            ("{not json", None, P.BAD_JSON, "JSON"),
            ("[1, 2]", None, P.BAD_JSON, "object"),
            ("[" * 2000, None, P.BAD_JSON, "JSON"),                              # absurdly deep
            (json.dumps({"type": "stats", "uri": URI}), None, P.BAD_REQUEST, '"id"'),
            (msg("frobnicate"), "x", P.UNKNOWN_TYPE, "frobnicate"),
            (msg("open", uri=URI), "x", P.BAD_REQUEST, '"text"'),
            (msg("complete", uri=URI, line="3", character=0), "x", P.BAD_REQUEST, '"line"'),
            (msg("complete", uri=URI, line=0, character=0, maxNewTokens=0), "x", P.BAD_REQUEST, "maxNewTokens"),
            (msg("complete", uri=URI, line=0, character=0, maxNewTokens=10**6), "x", P.BAD_REQUEST, "256"),
            (edit(9, {"range": {"start": {}}, "text": ""}), "x", P.BAD_REQUEST, "range.start"),
            (msg("stats", uri=nope), "x", P.UNKNOWN_URI, nope),
            (msg("close", uri=nope), "x", P.UNKNOWN_URI, nope),
            (msg("complete", uri=nope, line=0, character=0), "x", P.UNKNOWN_URI, nope),
            (msg("edit", uri=nope, version=1, changes=[]), "x", P.UNKNOWN_URI, nope),
            (edit(6, {"range": rng(999, 0), "text": "x"}), "x", P.BAD_RANGE, "line 999"),
            (edit(6, {"range": rng(1, 0, 0, 0), "text": ""}), "x", P.BAD_RANGE, "before"),
            (msg("complete", uri=URI, line=0, character=500), "x", P.BAD_RANGE, "500"),
            (edit(5, {"range": rng(0, 0), "text": "#"}), "x", P.BAD_VERSION, "version 5"),
            (msg("open", uri="file:///big.py", text="x" * 3000), "x", P.TOO_LARGE, "2048"),
        ]
        for raw, id_, code, words in cases:
            m = await err(raw, id_)
            assert m["code"] == code and words in m["message"], (raw[:60], m)

        # the connection and the document are as they were
        st = await c.call("stats", uri=URI)
        assert st["type"] == "stats" and st["stats"]["version"] == 5 and st["stats"]["edits"] == 0
        assert await server_texts(worker, URI) == [TEXT[:1000]]
        # a change without a range replaces the whole text
        r = await c.call("edit", uri=URI, version=6, changes=[{"text": "a = 1\n"},
                                                              {"range": rng(1, 0), "text": "b = 2\n"}])
        assert r["type"] == "ok" and r["stats"]["version"] == 6
        assert await server_texts(worker, URI) == ["a = 1\nb = 2\n"]


async def test_clients_have_their_own_documents(serve, worker):
    srv = serve()
    text_b = NUMBERS
    async with connect(srv.url) as wa, connect(srv.url) as wb:
        a, b = Client(wa), Client(wb)
        oa, ob = await asyncio.gather(a.call("open", uri=URI, text=TEXT), b.call("open", uri=URI, text=text_b))
        assert oa["type"] == ob["type"] == "ok" and oa["stats"]["tokens"] != ob["stats"]["tokens"]
        ia = await a.send("complete", "from-a", uri=URI, line=INSERT_AT, character=0, maxNewTokens=4)
        ib = await b.send("complete", "from-b", uri=URI, line=0, character=len(text_b), maxNewTokens=4)
        da, db = await asyncio.gather(a.reply(ia), b.reply(ib))
        assert da["text"] == "".join(a.tokens(ia)) == await reference(worker, TEXT, INSERT_AT, 0, 4)
        assert db["text"] == "".join(b.tokens(ib)) == await reference(worker, text_b, 0, len(text_b), 4)
        assert b.tokens(ia) == [] and a.tokens(ib) == []
        r = await a.call("edit", uri=URI, version=1, changes=[{"range": rng(0, 0), "text": "# a\n"}])
        assert r["type"] == "ok"
        assert (await b.call("stats", uri=URI))["stats"]["version"] == 0
        assert await server_texts(worker, URI) == sorted(["# a\n" + TEXT, text_b])
    # both connections are gone: so are their documents (closed as the server notices)
    for _ in range(HANG * 10):
        if await server_texts(worker, URI) == []:
            break
        await asyncio.sleep(0.1)
    assert await server_texts(worker, URI) == []


async def test_a_stuck_client_does_not_block_another(serve, worker):
    srv = serve()
    async with connect(srv.url) as wa:
        a = Client(wa)
        await a.call("hello")
        (stuck,) = srv.server._server.connections

        async def never(*args, **kw):  # this client's socket accepts nothing more
            await asyncio.Event().wait()
        stuck.send = never
        await a.send("open", uri=URI, text=NUMBERS)
        await a.send("complete", uri=URI, line=0, character=len(NUMBERS), maxNewTokens=4)
        async with connect(srv.url) as wb:
            b = Client(wb)
            assert (await b.call("open", uri=URI, text=NUMBERS))["type"] == "ok"
            assert (await b.call("edit", uri=URI, version=1, changes=[{"text": NUMBERS + "13"}]))["type"] == "ok"
            done = await b.reply(await b.send("complete", uri=URI, line=0, character=len(NUMBERS) + 2, maxNewTokens=2))
            assert done["type"] == "done"


async def test_pie_blend_serves_and_its_stats_say_what_it_recomputed(serve, worker):
    def use(strategy):  # the engine's strategy is what a new connection's documents get
        return on_worker(worker, lambda eng: setattr(eng, "config", eng.config.updated(strategy=strategy)))
    before = await on_worker(worker, lambda eng: eng.config.strategy)
    await use("pie-blend")
    try:
        srv = serve()
        async with connect(srv.url) as ws:
            c = Client(ws)
            assert (await c.call("open", uri=URI, text=TEXT))["type"] == "ok"
            change = {"range": rng(2, 0), "text": "        extra = compute(alpha)\n"}
            s = (await c.call("edit", uri=URI, version=1, changes=[change]))["stats"]
            cfg = Config()
            assert s["strategy"] == "pie-blend" and 0 < s["repaired_last_edit"] <= cfg.blend_cap
            assert 0 < s["repaired_share_last_edit"] <= cfg.blend_ratio + 1 / s["tokens"]
            assert s["tokens_encoded_last_edit"] == s["tokens_new_last_edit"] + s["repaired_last_edit"]
            cid = await c.send("complete", uri=URI, line=INSERT_AT + 1, character=0, maxNewTokens=4)
            assert (await c.reply(cid))["type"] == "done"
            assert (await c.call("stats", uri=URI))["stats"]["repaired_total"] >= s["repaired_last_edit"]
    finally:
        await use(before)
