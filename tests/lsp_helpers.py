"""Shared by the LSP tests: how to start the real server, and a client-side model of its text."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import torch

from livekv.lsp_server.framing import frame

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 6  # maxNewTokens for completions the tests compare with the engine
# The servers the tests start run the weights as loaded, like the session's engine (conftest):
# exact arithmetic, so a server's answer is the engine's. Faster precisions: test_precision.py.
EXACT = ("--precision", "fp32")


def server_command(*args: str) -> list[str]:
    # --encode-chunk 128: a small file's first encode takes several chunks, so progress reports
    return [sys.executable, "-m", "livekv", "lsp", "--max-new-tokens", "8", "--encode-chunk", "128", *EXACT, *args]


def server_env() -> dict[str, str]:
    # One torch thread each for the server and the test process: on 2 shared cores, two
    # processes with two threads each make every step 5-10x slower. Offline: a missing model
    # must fail at once instead of trying the hub. The checkout's root stays off the path: its
    # kernels/ would shadow Hugging Face's kernels package, which transformers imports.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


class one_thread:
    """Run the test process's engine on one torch thread (restored afterwards)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply(text: str, start: tuple[int, int], end: tuple[int, int], new: str) -> str:
    """Replace (line, column)..(line, column), columns in code points; lines end at \\n."""
    lines = text.split("\n")
    a = sum(len(s) + 1 for s in lines[: start[0]]) + start[1]
    b = sum(len(s) + 1 for s in lines[: end[0]]) + end[1]
    return text[:a] + new + text[b:]


def expected_completion(engine, text: str, line: int, col: int, n: int = MAX_NEW) -> str:
    """What the engine completes on text, opened fresh (pie and full are then identical)."""
    with one_thread():
        doc = engine.open("file:///expected.py", text)
        try:
            return doc.complete(line, col, max_new_tokens=n)
        finally:
            engine.close("file:///expected.py")


class RawClient:
    """JSON-RPC over raw bytes (a pipe or a socket), to send what no client library would:
    garbage, or several messages in one write. Every byte read must be LSP framing."""

    def __init__(self, write, stream):
        self.write, self.stream = write, stream
        self.replies: dict = {}
        self.junk: list[bytes] = []
        self.arrived = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while header := self.stream.readline():
            if not header.startswith(b"Content-Length: "):
                self.junk.append(header)
                continue
            n = int(header.split(b":")[1])
            while (h := self.stream.readline()) not in (b"\r\n", b""):
                if not h.startswith(b"Content-Type: "):
                    self.junk.append(h)
            msg = json.loads(self.stream.read(n))
            if "id" in msg and "method" not in msg:
                with self.arrived:
                    self.replies[msg["id"]] = msg
                    self.arrived.notify_all()

    def send(self, *messages) -> None:
        """Messages (dicts, or raw bytes sent as they are) in one write."""
        self.write(b"".join(m if isinstance(m, bytes) else frame(m) for m in messages))

    def request(self, id_, method: str, params=None) -> dict:
        return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}

    def notification(self, method: str, params=None) -> dict:
        return {"jsonrpc": "2.0", "method": method, "params": params}

    def reply(self, id_, timeout: float = 120) -> dict:
        with self.arrived:
            assert self.arrived.wait_for(lambda: id_ in self.replies, timeout), f"no reply to request {id_}"
            return self.replies[id_]

    def initialize(self) -> None:
        self.send(self.request(0, "initialize", {"capabilities": {}}))
        assert "capabilities" in self.reply(0)["result"]
        self.send(self.notification("initialized", {}))

    def open(self, uri: str, text: str) -> None:
        self.send(self.notification("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}}))

    def completion(self, id_, uri: str, line: int, character: int) -> dict:
        return self.request(id_, "textDocument/completion",
                            {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})

    def shutdown(self) -> None:
        self.send(self.request("bye", "shutdown"))
        assert self.reply("bye")["result"] is None
        self.send(self.notification("exit"))


def spawn_raw(stderr, *args: str, stdout=None, reader=None) -> tuple:
    """The real server with a RawClient on its stdin and stdout: (process, client). stderr: the
    file its log goes to; stdout/reader: the server's stdout (a file descriptor) and the stream
    the client reads it from, instead of a pipe."""
    import subprocess
    proc = subprocess.Popen(server_command(*args), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE if stdout is None else stdout, stderr=stderr,
                            env=server_env(), cwd=ROOT)

    def write(data: bytes) -> None:
        proc.stdin.write(data)
        proc.stdin.flush()
    return proc, RawClient(write, proc.stdout if reader is None else reader)


# -- pytest-lsp client helpers (for tests that drive the server through a LanguageClient) ------
def plain(x):
    """pygls hands custom replies over as namedtuples: back to dicts."""
    if hasattr(x, "_asdict"):
        return {k: plain(v) for k, v in x._asdict().items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def open_doc(c, uri: str, text: str, version: int = 1) -> None:
    from lsprotocol import types as T
    c.text_document_did_open(T.DidOpenTextDocumentParams(T.TextDocumentItem(
        uri=uri, language_id="python", version=version, text=text)))


def change(c, uri: str, version: int, *changes) -> None:
    """Each change is ((line, character), (line, character), text), or a str: the whole text."""
    from lsprotocol import types as T
    cc = [T.TextDocumentContentChangeWholeDocument(text=ch) if isinstance(ch, str) else
          T.TextDocumentContentChangePartial(range=T.Range(T.Position(*ch[0]), T.Position(*ch[1])), text=ch[2])
          for ch in changes]
    c.text_document_did_change(T.DidChangeTextDocumentParams(
        text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=version), content_changes=cc))


def configure(c, settings) -> None:
    from lsprotocol import types as T
    c.workspace_did_change_configuration(T.DidChangeConfigurationParams(settings=settings))


async def stats(c, uri: str | None = None, **extra) -> dict:
    """livekv/stats; with a uri it queues behind every job sent before (idle work included),
    so it also syncs; without, the server's stats, answered at once."""
    params = {"textDocument": {"uri": uri, **extra}} if uri else {}
    return plain(await c.protocol.send_request_async("livekv/stats", params))


async def inline(c, uri: str, line: int, character: int, manual: bool = True):
    """textDocument/inlineCompletion: manual (Invoked, as on a shortcut) or automatic (typing)."""
    from lsprotocol import types as T
    kind = T.InlineCompletionTriggerKind.Invoked if manual else T.InlineCompletionTriggerKind.Automatic
    res = await c.text_document_inline_completion_async(T.InlineCompletionParams(
        context=T.InlineCompletionContext(trigger_kind=kind), text_document=T.TextDocumentIdentifier(uri=uri),
        position=T.Position(line=line, character=character)))
    return res.items


async def completion_list(c, uri: str, line: int, character: int):
    """textDocument/completion: the whole CompletionList (items and isIncomplete)."""
    from lsprotocol import types as T
    return await c.text_document_completion_async(T.CompletionParams(
        text_document=T.TextDocumentIdentifier(uri=uri), position=T.Position(line=line, character=character)))


async def eventually(pred, what: str, timeout: float = 60.0):
    """Poll an async predicate: waiting on the protocol, never a timing assertion."""
    import asyncio
    import time
    end = time.monotonic() + timeout
    while not (got := await pred()):
        assert time.monotonic() < end, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)
    return got


# -- starting servers and asking them ----------------------------------------------------------
def init_params(encodings=None, options=None):
    from lsprotocol import types as T
    general = T.GeneralClientCapabilities(position_encodings=encodings) if encodings else None
    caps = T.ClientCapabilities(general=general, window=T.WindowClientCapabilities(work_done_progress=True))
    return T.InitializeParams(capabilities=caps, initialization_options=options)


async def start_server(encodings=None, options=None):
    """A real `livekv lsp` of its own, initialized: (client, InitializeResult)."""
    from pytest_lsp.client import make_test_lsp_client
    c = make_test_lsp_client()
    await c.start_io(*server_command(), env=server_env())
    return c, await c.initialize_session(init_params(encodings, options))


async def completion(c, uri: str, line: int, character: int):
    return (await completion_list(c, uri, line, character)).items


def errors(c) -> list[str]:
    from lsprotocol import types as T
    return [m.message for m in c.log_messages if m.type == T.MessageType.Error]


async def worker_busy(c) -> bool:
    return (await stats(c))["server"]["worker_busy_ms"] > 0
