"""`livekv lsp` end to end: pytest-lsp drives the real server process over stdio, which loads the
real embedded model; completions are compared with the Engine's on the same final text.

Most tests share one server (module scope) and use their own document. Encoding negotiation,
shutdown and raw-garbage tests start their own servers.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import pytest
import pytest_lsp
from lsprotocol import types as T
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcRequestCancelled
from pytest_lsp import ClientServerConfig, LanguageClient
from pytest_lsp.client import make_test_lsp_client

from conftest import excerpt, stdlib_source
from lsp_helpers import (MAX_NEW, ROOT, RawClient, apply, change, completion_list, configure, eventually,
                         expected_completion, inline, open_doc, server_command, server_env, sha, stats)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = excerpt(stdlib_source(), 183, 32)  # difflib's set_seqs and set_seq1: about 250 tokens
LINES = TEXT.split("\n")
COUNTING = "    numbers = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, "  # the model keeps counting: a long decode


def init_params(encodings=None, options=None) -> T.InitializeParams:
    general = T.GeneralClientCapabilities(position_encodings=encodings) if encodings else None
    caps = T.ClientCapabilities(general=general, window=T.WindowClientCapabilities(work_done_progress=True))
    return T.InitializeParams(capabilities=caps, initialization_options=options)


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=server_command(), server_env=server_env()))
async def client(lsp_client: LanguageClient):
    # initializationOptions override the command line's --max-new-tokens 8. repoContext off: the
    # tests' documents stay open in this shared server, and as each other's context groups their
    # completions would no longer be a fresh Engine.open's (the servers started per test keep it on)
    lsp_client.init_result = await lsp_client.initialize_session(
        init_params(options={"livekv": {"maxNewTokens": MAX_NEW, "repoContext": False}}))
    yield
    await lsp_client.shutdown_session()


async def start_server(encodings=None, options=None) -> tuple[LanguageClient, T.InitializeResult]:
    c = make_test_lsp_client()
    await c.start_io(*server_command(), env=server_env())
    return c, await c.initialize_session(init_params(encodings, options))


# -- small client helpers ----------------------------------------------------------------------
async def completion(c: LanguageClient, uri: str, line: int, character: int):
    return (await completion_list(c, uri, line, character)).items


def errors(c: LanguageClient) -> list[str]:
    return [m.message for m in c.log_messages if m.type == T.MessageType.Error]


async def worker_busy(c: LanguageClient) -> bool:
    return (await stats(c))["server"]["worker_busy_ms"] > 0


# -- tests -------------------------------------------------------------------------------------
async def test_initialize_advertises_the_protocol(client: LanguageClient):
    caps = client.init_result.capabilities
    assert caps.position_encoding == T.PositionEncodingKind.Utf16  # the client offered nothing else
    assert caps.text_document_sync.change == T.TextDocumentSyncKind.Incremental
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert (await stats(client))["server"]["settings"]["max_new_tokens"] == MAX_NEW


async def test_first_encode_reports_progress(client: LanguageClient):
    open_doc(client, "file:///progress.py", TEXT)

    async def ended():
        for values in client.progress_reports.values():
            if values and values[0].message == "progress.py" and values[-1].kind == "end":
                return values
    begin, *reports, end = await eventually(ended, "the progress of the first encode")
    assert begin.kind == "begin" and begin.percentage == 0
    assert len(reports) >= 2, reports  # about 250 tokens in chunks of 128
    percents = [r.percentage for r in reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert end.kind == "end"


async def test_edits_then_completions_match_the_engine(client: LanguageClient, engine):
    uri, text = "file:///edits.py", TEXT
    open_doc(client, uri, text)
    await stats(client, uri)  # warmed up: an edit arriving earlier would take over the rest of the encode
    k = LINES.index("        self.set_seq1(a)")
    m = LINES.index("        0.75", k)
    p = LINES.index("        The second sequence to be compared is not changed.")
    # typing a new line in the middle, keystroke by keystroke
    typed = [((k, len(LINES[k])), (k, len(LINES[k])), "\n        self"), ((k + 1, 12), (k + 1, 12), ".set_")]
    for v, ch in enumerate(typed, start=2):
        change(client, uri, v, ch)
        text = apply(text, *ch)
    # one notification, two changes: the second is relative to the text after the first
    batch = [((m + 1, 0), (m + 1, 0), "        # a comment line\n"), ((m + 2, 8), (m + 2, 12), "0.5")]
    change(client, uri, 4, *batch)
    for ch in batch:
        text = apply(text, *ch)
    deletion = ((p + 1, 0), (p + 3, 0), "")  # two whole lines
    change(client, uri, 5, deletion)
    text = apply(text, *deletion)

    s = await stats(client, uri)
    assert s["text_sha256"] == sha(text) and s["lsp_version"] == 5
    assert s["tokens"] == len(engine.tokenizer(text, add_special_tokens=False).input_ids)
    # PIE: only new tokens are encoded (edits that came in a burst are encoded together), moved keys rotated
    assert 0 < s["tokens_encoded_last_edit"] < s["tokens"] // 4 and s["keys_rotated_last_edit"] > 0, s

    # the cursor ends the typed text: everything before it is exact under PIE
    line, col = k + 1, len("        self.set_")
    want = expected_completion(engine, text, line, col)
    assert want, "pick a cursor where the model completes something"
    items = await inline(client, uri, line, col)
    assert [i.insert_text for i in items] == [want]
    assert items[0].range == T.Range(T.Position(line, col), T.Position(line, col))
    items = await completion(client, uri, line, col)
    assert [i.text_edit.new_text for i in items] == [want] and items[0].insert_text == want
    assert items[0].text_edit.range == T.Range(T.Position(line, col), T.Position(line, col))


async def test_full_text_change_is_one_small_splice(client: LanguageClient, engine):
    uri = "file:///full.py"
    open_doc(client, uri, TEXT)
    await stats(client, uri)
    k = LINES.index("        self.set_seq2(b)")
    new = "\n".join(LINES[:k] + ["        self.set_seq2(b or a)"] + LINES[k + 1:])
    change(client, uri, 2, new)
    s = await stats(client, uri)
    assert s["text_sha256"] == sha(new) and s["lsp_version"] == 2
    assert s["tokens_encoded_last_edit"] < s["tokens"] // 4, s  # a splice, not a re-encode

    # a whole-text change followed by a partial change on that text, in one notification
    ch = ((0, 4), (0, 7), "async def")
    change(client, uri, 3, TEXT, ch)
    final = apply(TEXT, *ch)
    s = await stats(client, uri)
    assert s["text_sha256"] == sha(final) and s["lsp_version"] == 3
    line, col = 0, len("    async def ")
    want = expected_completion(engine, final, line, col)
    assert [i.insert_text for i in await inline(client, uri, line, col)] == ([want] if want else [])


async def test_version_going_backwards_is_rejected(client: LanguageClient):
    uri = "file:///versions.py"
    open_doc(client, uri, TEXT, version=3)
    change(client, uri, 4, ((0, 0), (0, 0), "x = 1\n"))
    change(client, uri, 2, ((0, 0), (0, 0), "BACKWARDS\n"))
    change(client, uri, 4, ((0, 0), (0, 0), "SAME VERSION\n"))
    s = await stats(client, uri)
    assert s["text_sha256"] == sha("x = 1\n" + TEXT) and s["lsp_version"] == 4
    assert sum("is not after its current version 4" in e for e in errors(client)) == 2


async def test_bad_input_gets_errors_and_changes_nothing(client: LanguageClient):
    uri = "file:///bad.py"
    open_doc(client, uri, TEXT)
    before = await stats(client, uri)
    for call, fragment in [(inline(client, "file:///nope.py", 0, 0), "not open"),
                           (completion(client, uri, 10_000, 0), "line 10000 is outside the document"),
                           (inline(client, uri, 0, 500), "past the end of the line"),
                           (stats(client, uri, version=99), "not 99"),
                           (stats(client, "file:///nope.py"), "not open")]:
        with pytest.raises(JsonRpcInvalidParams, match=fragment):
            await call
    with pytest.raises(JsonRpcInvalidParams, match="expected"):
        await client.protocol.send_request_async("livekv/stats", {"uri": 5})

    n = len(errors(client))
    change(client, uri, 2, ((999, 0), (999, 0), "x"))                         # line out of range
    change(client, uri, 2, ((3, 4), (2, 0), "x"))                             # end before start
    change(client, uri, 2, ((0, 0), (0, 0), "ok\n"), ((0, 99), (0, 99), "x"))  # second change invalid
    change(client, "file:///nope.py", 2, ((0, 0), (0, 0), "x"))               # unknown document
    client.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier("file:///nope.py")))
    after = await stats(client, uri)
    new = errors(client)[n:]
    assert len(new) == 5, new
    assert "line 999 is outside the document" in new[0] and "before its start" in new[1]
    assert "change 2 of 2" in new[2] and "not open" in new[3] and "not open" in new[4]
    assert after["text_sha256"] == before["text_sha256"] and after["lsp_version"] == 1
    assert await inline(client, uri, 3, 8) is not None  # still serving


def units(s: str, enc: str) -> int:
    # independent of the server's own conversion code
    return {"utf-16": len(s.encode("utf-16-le")) // 2, "utf-8": len(s.encode("utf-8")), "utf-32": len(s)}[enc]


async def non_ascii_columns(c: LanguageClient, engine, enc: str, n: int = MAX_NEW) -> None:
    uri = f"file:///unicode-{enc}.py"
    text = 'def greet(name):\n    s = "😀 你好 " + name  # 👋 héllo\n    return s\n'
    open_doc(c, uri, text)
    line = text.split("\n")[1]
    after_emoji = line.index("😀") + 1
    cjk = line.index("你好")
    # insert after the emoji, then replace the CJK word: positions in the negotiated encoding
    at = (1, units(line[:after_emoji], enc))
    change(c, uri, 2, (at, at, "!"))
    line = line[:after_emoji] + "!" + line[after_emoji:]
    cjk += 1
    change(c, uri, 3, ((1, units(line[:cjk], enc)), (1, units(line[:cjk + 2], enc)), "世界"))
    line = line[:cjk] + "世界" + line[cjk + 2:]
    final = text.replace(text.split("\n")[1], line)
    s = await stats(c, uri)
    assert s["text_sha256"] == sha(final), "the server put the edits elsewhere"

    end = units(line, enc)
    want = expected_completion(engine, final, 1, len(line), n)
    items = await inline(c, uri, 1, end)
    assert [i.insert_text for i in items] == ([want] if want else [])
    if items:
        assert items[0].range.start == T.Position(1, end)  # back in the client's units
    items = await completion(c, uri, 1, end)
    assert [i.text_edit.new_text for i in items] == ([want] if want else [])
    if enc != "utf-32":  # a position inside the emoji's code units
        with pytest.raises(JsonRpcInvalidParams, match="falls inside"):
            await inline(c, uri, 1, units(line[:after_emoji - 1], enc) + 1)


async def test_position_conversions_agree_with_python_codecs():
    # async only to share the module's event loop mark; no server needed
    from livekv.incremental.lines import character as to_character, column as to_column
    line = "a😀b你c\u00e9 \U0001F44B"
    for enc in ("utf-16", "utf-8", "utf-32"):
        for col in range(len(line) + 1):
            ch = units(line[:col], enc)
            assert to_column(line, ch, enc) == col and to_character(line, col, enc) == ch
        with pytest.raises(ValueError, match="past the end"):
            to_column(line, units(line, enc) + 1, enc)
    with pytest.raises(ValueError, match="falls inside"):
        to_column(line, 2, "utf-16")  # between the two halves of 😀
    with pytest.raises(ValueError, match="falls inside"):
        to_column(line, 3, "utf-8")


async def test_utf16_columns_on_emoji_and_cjk(client: LanguageClient, engine):
    await non_ascii_columns(client, engine, "utf-16")


@pytest.mark.parametrize("enc", ["utf-8", "utf-32"])
async def test_negotiated_encoding(enc, engine):
    # also: invalid initializationOptions are refused and the command line's settings used
    c, result = await start_server(encodings=[enc, "utf-16"], options={"livekv": {"maxNewTokens": 0}})
    try:
        assert result.capabilities.position_encoding == enc
        assert any("initializationOptions refused" in m.message and "max_new_tokens must be at least 1" in m.message
                   for m in c.messages)
        assert (await stats(c))["server"]["settings"]["max_new_tokens"] == 8
        await non_ascii_columns(c, engine, enc, n=8)
    finally:
        await c.shutdown_session()
        await c.stop()


async def test_settings_are_validated_and_applied(client: LanguageClient, engine):
    uri = "file:///settings.py"
    open_doc(client, uri, TEXT)
    before = (await stats(client, uri))["server"]["settings"]
    n = len(client.messages)
    configure(client, {"livekv": {"strategy": "bogus"}})
    configure(client, {"livekv": {"maxNewTokens": "many"}})
    configure(client, {"livekv": {"maxTokens": 3}})
    configure(client, {"livekv": {"device": "cuda:99"}})  # valid shape, fails to load
    s = await stats(client, uri)
    shown = [m.message for m in client.messages[n:] if m.type == T.MessageType.Error]
    assert len(shown) == 4 and all("refused" in m and "old settings stay" in m for m in shown), shown
    assert s["server"]["settings"] == before and s["strategy"] == "pie"

    line, col = LINES.index("        self.set_seq2(b)"), len("        self.set_")
    configure(client, {"maxNewTokens": 2, "strategy": "full", "python": {"other": "tool"}})  # top level
    s = await stats(client, uri)
    assert s["strategy"] == "full" and s["server"]["settings"]["max_new_tokens"] == 2
    assert [i.insert_text for i in await inline(client, uri, line, col)] == [expected_completion(engine, TEXT, line, col, 2)]
    assert (await stats(client, uri))["last_completion"]["steps"] <= 2

    # a model change reloads the engine on the worker and re-opens the documents
    configure(client, {"livekv": {"model": "smollm2-135m", "strategy": "pie", "maxNewTokens": MAX_NEW}})
    s = await stats(client, uri)
    assert s["model"] == "smollm2-135m" and s["strategy"] == "pie" and s["text_sha256"] == sha(TEXT)
    assert [i.insert_text for i in await inline(client, uri, line, col)] == [expected_completion(engine, TEXT, line, col)]


async def test_cancel_and_edit_stop_a_running_completion(client: LanguageClient):
    uri = "file:///cancel.py"
    text = TEXT + COUNTING
    line, col = text.count("\n"), len(COUNTING)
    open_doc(client, uri, text)
    configure(client, {"livekv": {"maxNewTokens": 64}})
    busy_before = (await stats(client, uri))["server"]["cancel_busy_ms"]
    params = T.CompletionParams(text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=line, character=col))
    try:
        # $/cancelRequest: the reply is RequestCancelled
        fut = asyncio.wrap_future(client.protocol.send_request(T.TEXT_DOCUMENT_COMPLETION, params, msg_id="long-1"))
        await eventually(lambda: worker_busy(client), "the decode to start")
        client.protocol.notify(T.CANCEL_REQUEST, T.CancelParams(id="long-1"))
        with pytest.raises(JsonRpcRequestCancelled):
            await fut
        s = await stats(client, uri)
        assert s["last_completion"]["stop"] == "cancelled" and s["last_completion"]["steps"] < 64, s["last_completion"]

        # an edit to the document abandons its running completion: an empty, incomplete list
        fut = asyncio.wrap_future(client.protocol.send_request(T.TEXT_DOCUMENT_COMPLETION, params))
        await eventually(lambda: worker_busy(client), "the decode to start")
        change(client, uri, 2, ((0, 0), (0, 0), "# edited\n"))
        res = await fut
        assert list(res.items) == [] and res.is_incomplete
        s = await stats(client, uri)
        assert s["last_completion"]["stop"] == "cancelled" and s["text_sha256"] == sha("# edited\n" + text)
    finally:
        configure(client, {"livekv": {"maxNewTokens": MAX_NEW}})
    busy = s["server"]["cancel_busy_ms"][len(busy_before):]
    assert len(busy) == 2, busy  # both jobs ended and were measured
    print(f"\ncancelled completions kept the worker busy {busy[0]:.1f} ms ($/cancelRequest) and "
          f"{busy[1]:.1f} ms (didChange) after the cancel")


async def test_shutdown_is_answered_within_a_second_during_a_long_decode():
    c, _ = await start_server(options={"livekv": {"maxNewTokens": 200}})
    try:
        uri, text = "file:///long.py", TEXT + COUNTING
        open_doc(c, uri, text)
        await stats(c, uri)
        pending = asyncio.ensure_future(completion(c, uri, text.count("\n"), len(COUNTING)))
        await eventually(lambda: worker_busy(c), "the decode to start")
        t0 = time.perf_counter()
        await c.shutdown_async(None)
        took = time.perf_counter() - t0
        print(f"\nshutdown answered in {took * 1e3:.0f} ms during a decode")
        assert took < 1.0  # protocol timing: the event loop never waits for the model
        with pytest.raises(JsonRpcRequestCancelled):
            await pending
        c.exit(None)
        assert await asyncio.wait_for(c._server.wait(), 60) == 0
    finally:
        await c.stop()


async def test_tcp_queues_requests_in_arrival_order():
    """`--tcp`: a completion and an edit in ONE write reach the server in one read; the
    completion is queued first, so the edit abandons it (no items). Alone it gives text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(server_command("--tcp", f"127.0.0.1:{port}"), env=server_env(), cwd=ROOT)
    try:
        await asyncio.to_thread(tcp_session, port)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def tcp_session(port: int) -> None:
    end = time.monotonic() + 120
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < end, "the server never listened"
            time.sleep(0.1)
    with sock:
        c = RawClient(sock.sendall, sock.makefile("rb"))
        c.initialize()
        uri, line, col = "file:///tcp.py", LINES.index("        self.set_seq2(b)"), len("        self.set_")
        c.open(uri, TEXT)
        c.send(c.request(1, "livekv/stats", {"uri": uri}))
        c.reply(1)
        edit = c.notification("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "# edited\n"}]})
        c.send(c.completion(2, uri, line, col), edit)
        assert c.reply(2)["result"]["items"] == []
        c.send(c.completion(3, uri, line + 1, col))
        assert len(c.reply(3)["result"]["items"]) == 1
        c.shutdown()
        assert c.junk == []


async def test_malformed_messages_do_not_kill_the_server(tmp_path):
    """Raw bytes on the real server's stdin; stdout must stay pure LSP framing throughout."""
    await asyncio.to_thread(raw_session, tmp_path)


def raw_session(tmp_path):
    err = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen(server_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                            env=server_env(), cwd=ROOT)

    def write(data: bytes) -> None:
        proc.stdin.write(data)
        proc.stdin.flush()
    c = RawClient(write, proc.stdout)
    try:
        c.initialize()
        c.send(b"Content-Length: 17\r\n\r\n{this is not json",                    # bad JSON, right length
               b"Content-Length: 12\r\n\r\n\xff\xfe not utf-8",                  # not even text
               b"Content-Lenght: 7\r\n\r\nhello\r\n",                            # a wrong header
               b"garbage line\r\n\r\n",                                         # no header at all
               b"Content-Length: 9\r\n\r\n[1, 2, 3]",                            # JSON, not JSON-RPC
               c.notification("no/such/notification", {}),
               c.request(2, "textDocument/completion", {                         # params of the wrong type
                   "textDocument": {"uri": "file:///x.py"}, "position": {"line": "zero", "character": 0}}),
               c.request(3, "no/such/method", {}))
        assert c.reply(2)["error"]["code"] == -32602
        assert c.reply(3)["error"]["code"] == -32601
        c.open("file:///ok.py", TEXT)
        c.send(c.completion(4, "file:///ok.py", 3, 8))
        assert "items" in c.reply(4)["result"]
        c.shutdown()
        assert proc.wait(60) == 0
        c.reader.join(10)
        assert c.junk == [], "something other than LSP was written to stdout"
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
