"""LSP framing and JSON-RPC envelopes: no byte sequence deafens the server. The Framer on its own
(hypothesis: valid messages among every kind of bad framing, cut into random reads), then the
real server on raw stdin: each bad case, then a valid request that must get its answer; and
random bytes, JSON and valid-looking requests before valid ones (hypothesis, the real server)."""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings, strategies as st

from livekv.lsp_server.framing import Framer, frame

from lsp_helpers import spawn_raw


def body(i: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "m", "params": {"text": "é\r\n" * (i % 3)}}).encode()


def bad(kind: str, i: int) -> bytes:
    b = body(i)
    return {"no length": b"Content-Type: x\r\n\r\n" + b,
            "not a number": b"Content-Length: 12a\r\n\r\n" + b,
            "short": b"Content-Length: %d\r\n\r\n" % (len(b) + 10) + b,
            "long": b"Content-Length: %d\r\n\r\n" % (len(b) - 20) + b,
            "huge": b"Content-Length: 1000000000000\r\n\r\n" + b,
            "junk": b"garbage\r\n",
            "not json": frame(b"{this is not json}")}[kind]


KINDS = ["no length", "not a number", "short", "long", "huge", "junk", "not json"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.just("ok"), st.sampled_from(KINDS), st.binary(max_size=40)), min_size=1, max_size=12),
       st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_every_valid_message_comes_through(segments, cuts):
    data, valid = b"", []
    for i, kind in enumerate(segments):
        data += kind if isinstance(kind, bytes) else frame(body(i)) if kind == "ok" else bad(kind, i)
        valid += [i] if kind == "ok" else []
    f, out, at = Framer(1 << 20), [], 0
    for n in cuts * (len(data) // max(1, sum(cuts)) + 1):
        out += f.feed(data[at: at + n])
        at += n
    out += f.flush()
    got = [p["id"] for k, p in out if k == "message"]
    assert [i for i in got if i in valid] == valid  # all of them, in order
    assert not set(got) - set(range(len(segments)))
    if any(k not in ("ok", "junk") and not isinstance(k, bytes) for k in segments):  # a run of bad frames is reported at least once
        assert any(k == "problem" for k, _ in out)
    assert len(f.buf) <= 1 << 16  # discarded bytes are not kept


def test_a_huge_length_is_never_allocated():
    f = Framer(1 << 20)
    out = f.feed(b"Content-Length: 1000000000000\r\n\r\n" + b"x" * 100_000)
    assert [k for k, _ in out] == ["problem"] and "cap" in out[0][1] and len(f.buf) < 64
    assert [p["id"] for k, p in f.feed(frame(body(7))) if k == "message"] == [7]


def test_a_body_shorter_than_declared_is_taken_once_the_client_goes_quiet():
    f = Framer(1 << 20)
    b = body(3)
    assert f.feed(b"Content-Length: %d\r\n\r\n" % (len(b) + 10) + b) == []
    kinds = f.flush()
    assert [k for k, _ in kinds] == ["problem", "message"] and kinds[1][1]["id"] == 3


def test_the_server_answers_after_each_bad_frame_and_envelope(tmp_path):
    err = open(tmp_path / "stderr.txt", "wb")
    proc, c = spawn_raw(err)
    try:
        c.initialize()
        for n, kind in enumerate(KINDS, start=10):
            c.send(bad(kind, 99), c.request(n, "livekv/stats"))
            assert "server" in c.reply(n, timeout=60)["result"], kind
        envelopes = [(20, b"[" + json.dumps(c.request(5, "livekv/stats")).encode() + b"]", None),
                     (21, json.dumps({"id": 21, "method": "livekv/stats"}).encode(), 21),
                     (22, json.dumps({"jsonrpc": "2.0", "id": None, "method": "livekv/stats"}).encode(), None)]
        for n, raw, reply_id in envelopes:
            c.replies.pop(None, None)
            c.send(frame(raw), c.request(n + 100, "livekv/stats"))
            assert "result" in c.reply(n + 100)
            assert c.reply(reply_id)["error"]["code"] == -32600, raw
        typed = [{"line": 0, "character": "0"}, {"line": 0, "character": 0.5}, {"line": -1, "character": 0}]
        c.open("file:///ok.py", "import os\n")
        for n, pos in enumerate(typed, start=30):
            c.send(c.request(n, "textDocument/completion", {"textDocument": {"uri": "file:///ok.py"}, "position": pos}))
            assert c.reply(n)["error"]["code"] == -32602, pos
        c.send(c.request("bye", "shutdown"))
        assert c.reply("bye")["result"] is None
        c.send(c.request(40, "livekv/stats"))
        assert c.reply(40)["error"]["code"] == -32600 and "shut down" in c.reply(40)["error"]["message"]
        c.send(c.notification("exit"))
        assert proc.wait(60) == 0
        c.reader.join(10)
        assert c.junk == []
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    log = (tmp_path / "stderr.txt").read_text()
    for said in ("over the 67,108,864-byte cap", "'12a' is not a number", "skipped 9 bytes", "not JSON", "batch"):
        assert said in log
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    err = open(tmp_path_factory.mktemp("fuzz") / "stderr.txt", "wb")
    proc, c = spawn_raw(err)
    c.initialize()
    yield c
    proc.kill()
    err.close()


METHODS = ["textDocument/completion", "textDocument/inlineCompletion", "livekv/stats", "textDocument/didChange",
           "textDocument/didOpen", "textDocument/didClose", "$/cancelRequest", "workspace/didChangeConfiguration",
           "initialize", "no/such/method"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
AT = st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({"uri": st.sampled_from(["file:///fuzz.py", "x"])}),
                            "position": st.fixed_dictionaries({"line": st.integers(-1, 3) | JSON,
                                                               "character": st.integers(-1, 30) | JSON})})
REQUEST = st.builds(lambda m, i, p: frame({"jsonrpc": "2.0", "method": m, "params": p, **({} if i is None else {"id": i})}),
                    st.sampled_from(METHODS), st.none() | st.integers(1000, 9999) | st.text(max_size=4), JSON | AT)
GARBAGE = (st.binary(max_size=80) | REQUEST | JSON.map(lambda v: frame(json.dumps(v).encode()))
           | st.builds(bad, st.sampled_from(KINDS), st.integers(0, 9)))
PROBES = itertools.count()


@settings(max_examples=30, deadline=None)
@given(st.lists(GARBAGE, max_size=6))
def test_after_random_garbage_valid_requests_get_their_answers(fuzzed, garbage):
    c, n = fuzzed, next(PROBES)
    uri = f"file:///probe{n}.py"
    c.send(*garbage, c.notification("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": "import os\n\ndef main():\n    return os.getc"}}),
           c.request(f"stats-{n}", "livekv/stats", {"textDocument": {"uri": uri}}),
           c.completion(f"complete-{n}", uri, 3, 17))
    assert c.reply(f"stats-{n}", timeout=120)["result"]["lsp_version"] == 1
    assert "items" in c.reply(f"complete-{n}", timeout=120)["result"]
    c.send(c.notification("textDocument/didClose", {"textDocument": {"uri": uri}}))
