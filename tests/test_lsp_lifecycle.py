"""`livekv lsp`'s lifecycle as a client sees it: cancellation, shutdown during a long decode, TCP
arrival order, and garbage on the wire. Each test starts its own real server process."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import pytest
from lsprotocol import types as T
from pygls.exceptions import JsonRpcRequestCancelled

from conftest import excerpt, stdlib_source
from lsp_helpers import (MAX_NEW, ROOT, RawClient, change, completion, configure, eventually, open_doc,
                         server_command, server_env, sha, spawn_raw, start_server, stats, worker_busy)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = excerpt(stdlib_source(), 183, 32)  # difflib's set_seqs and set_seq1: about 250 tokens
LINES = TEXT.split("\n")
COUNTING = "    numbers = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, "  # the model keeps counting: a long decode


async def test_cancel_and_edit_stop_a_running_completion():
    client, _ = await start_server(options={"livekv": {"repoContext": False}})
    try:
        await cancel_and_edit(client)
    finally:
        await client.shutdown_session()
        await client.stop()


async def cancel_and_edit(client):
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
    proc, c = spawn_raw(err)
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


@pytest.mark.parametrize("how", ["exit without shutdown", "client dies"])
async def test_leaving_during_completions_is_quiet(tmp_path, how):
    """Completions decoding and queued when the client leaves: the process ends with code 1
    (no shutdown came), and stderr holds a few log lines, not tracebacks."""
    await asyncio.to_thread(leave_during_completions, tmp_path, how)


def leave_during_completions(tmp_path, how: str) -> None:
    err = open(tmp_path / "stderr.txt", "wb")
    # the server's stdout is a socket: shutting it down wakes the client's reader, as a dying
    # client's pipe would (closing a pipe that a thread is reading blocks on its lock)
    ours, theirs = socket.socketpair()
    proc, c = spawn_raw(err, "--max-new-tokens", "200", stdout=theirs.fileno(), reader=ours.makefile("rb"))
    theirs.close()
    try:
        c.initialize()
        lines = TEXT.split("\n") + [COUNTING]
        c.open("file:///long.py", "\n".join(lines))
        c.send(c.completion(1, "file:///long.py", 0, 0))
        c.reply(1)  # the model is loaded
        c.send(*[c.completion(i, "file:///long.py", len(lines) - 1, len(COUNTING)) for i in range(2, 7)])
        time.sleep(0.5)  # the last one is decoding, with replies to the others going out
        if how == "exit without shutdown":
            c.send(c.notification("exit"))
        else:
            ours.shutdown(socket.SHUT_RDWR)
        proc.stdin.close()
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    log = (tmp_path / "stderr.txt").read_text(errors="replace")
    for bad in ("Traceback", "write to closed file", "terminate called", "Exception ignored"):
        assert bad not in log, log[-3000:]
    assert log.count("\n") < 20, log[-3000:]
