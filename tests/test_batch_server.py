"""`livekv serve` with batched decode (Worker + incremental/batch.py), through the real websocket
server over a tiny random Llama: completions of several connections share forward passes and
answer what each answers alone; a cancel stops a batched completion while the others go on; a
long paste on one connection does not hold another's decode (its encode joins the batch chunk by
chunk), which the serial server (--batch-decode off) does."""
from __future__ import annotations

import asyncio
import threading

import pytest
from websockets.asyncio.client import connect

from conftest import excerpt, stdlib_source, tiny_llama, train_tokenizer
from lsp_helpers import eventually
from livekv.lsp_server.worker import Worker
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions
from ws_helpers import HANG, Client

SOURCE = stdlib_source()
MAX_NEW = 24


@pytest.fixture(scope="module")
def eng():
    return tiny_llama(train_tokenizer(), seed=5, max_new_tokens=MAX_NEW, encode_chunk=16)


def reference(eng, text: str, line: int, col: int):
    """The engine's own completion of a freshly opened text, alone (col in code points)."""
    doc = eng.open("file:///reference.py", text)
    try:
        return doc.suggest(line, col)
    finally:
        eng.close("file:///reference.py")


@pytest.fixture(scope="module")
def files(eng):
    """Six (text, line, col, reference completion) whose completions run long, on ASCII code (so
    utf-16 columns are code points)."""
    out = []
    for first in range(200, 4000, 37):
        text = excerpt(SOURCE, first, 16)
        if not text.isascii():
            continue
        lines = text.split("\n")
        line = 8
        comp = reference(eng, text, line, len(lines[line]))
        if comp.steps >= MAX_NEW // 2 and comp.text:
            out.append((text, line, len(lines[line]), comp))
        if len(out) == 6:
            return out
    raise AssertionError("no long completions found on this tiny model")


class Server:
    def __init__(self, eng, batch: bool):
        self.worker = Worker(lambda: eng, batch=batch)
        self.bg = BackgroundServer(self.worker, ServeOptions(port=0))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bg.close()
        self.worker.close(timeout=HANG)


async def test_completions_of_several_connections_share_passes_and_answer_as_alone(eng, files):
    with Server(eng, batch=True) as srv:
        async with connect(srv.bg.url) as w0, connect(srv.bg.url) as w1, connect(srv.bg.url) as w2, \
                connect(srv.bg.url) as w3:
            clients = [Client(w) for w in (w0, w1, w2, w3)]
            for c, (text, *_rest) in zip(clients, files):
                assert (await c.call("open", uri="file:///same/name.py", text=text))["type"] == "ok"
            ids = [await c.send("complete", uri="file:///same/name.py", line=line, character=col)
                   for c, (_, line, col, _ref) in zip(clients, files)]
            answers = await asyncio.gather(*[c.reply(i) for c, i in zip(clients, ids)])
        for a, c, i, (*_, ref) in zip(answers, clients, ids, files):
            assert a["type"] == "done" and not a["cancelled"]
            assert a["text"] == ref.text == "".join(c.tokens(i))  # its own document's answer, streamed
        assert srv.worker.scheduler.widest >= 2  # they did run in shared forwards


async def test_a_cancel_stops_one_batched_completion_and_the_others_go_on(eng, files):
    with Server(eng, batch=True) as srv:
        async with connect(srv.bg.url) as wa, connect(srv.bg.url) as wb:
            a, b = Client(wa), Client(wb)
            (ta, la, ca, ra), (tb, lb, cb, rb) = files[0], files[1]
            await a.call("open", uri="file:///a.py", text=ta)
            await b.call("open", uri="file:///b.py", text=tb)
            ia = await a.send("complete", uri="file:///a.py", line=la, character=ca)
            ib = await b.send("complete", uri="file:///b.py", line=lb, character=cb)
            await a.reply(ia, types=("token",))
            await a.call("cancel", id_=ia)
            done_a, done_b = await a.reply(ia), await b.reply(ib)
    assert done_a["cancelled"] and ra.text.startswith(done_a["text"]) and done_a["text"] != ra.text
    assert not done_b["cancelled"] and done_b["text"] == rb.text


def paste(eng) -> str:
    """Text that takes many encode chunks: more than a completion's steps."""
    for end in range(2000, len(SOURCE), 2000):
        if len(eng.mirror.tokenize(SOURCE[:end])[0]) > 3 * MAX_NEW * eng.config.encode_chunk:
            return SOURCE[:end]
    raise AssertionError("the source is too short for the paste")


@pytest.mark.parametrize("batch", [True, False])
async def test_a_long_paste_does_not_hold_another_connections_decode(eng, files, batch):
    """A pastes a long text (many chunks), then B asks for a completion: batched, B's answer
    comes before A's edit is done, its steps running beside A's chunks; serial, after."""
    text, line, col, ref = files[2]
    big = paste(eng)
    with Server(eng, batch=batch) as srv:
        async with connect(srv.bg.url) as wa, connect(srv.bg.url) as wb:
            a, b = Client(wa), Client(wb)
            await a.call("open", uri="file:///paste.py", text="# paste here\n")
            await b.call("open", uri="file:///b.py", text=text)
            ia = await a.send("edit", uri="file:///paste.py", version=1, changes=[{"text": big}])
            ib = await b.send("complete", uri="file:///b.py", line=line, character=col)
            order = []

            async def wait(c, i, who):
                msg = await c.reply(i)
                order.append(who)
                return msg
            edit, done = await asyncio.wait_for(asyncio.gather(wait(a, ia, "edit"), wait(b, ib, "done")), HANG)
    assert edit["type"] == "ok" and edit["stats"]["dirty_tokens"] == 0
    assert done["text"] == ref.text
    assert order == (["done", "edit"] if batch else ["edit", "done"])


async def test_an_edit_followed_by_a_completion_encodes_in_the_completions_first_pass(eng, files):
    """An edit with a completion for the same document right behind it leaves its new tokens to
    the completion's first pass (one pass of the weights, not two); the answer is the edited
    text's."""
    text, line, col, _ = files[3]
    typed = "value = total + 1"
    lines = text.split("\n")
    edited = "\n".join(lines[:line] + [lines[line] + typed] + lines[line + 1:])
    want = reference(eng, edited, line, col + len(typed))
    with Server(eng, batch=True) as srv:
        async with connect(srv.bg.url) as ws:
            c = Client(ws)
            await c.call("open", uri="file:///r.py", text=text)
            # the worker is held while both arrive, as when it is busy with other editors: the
            # edit rides only when its completion is already queued as it starts
            gate = threading.Event()
            srv.worker.submit(lambda _engine: gate.wait(HANG))
            async def queued(k):
                return srv.worker.queued() == k
            await eventually(lambda: queued(0), "the worker to hold", HANG)
            ie = await c.send("edit", uri="file:///r.py", version=1,
                              changes=[{"range": {"start": {"line": line, "character": col},
                                                  "end": {"line": line, "character": col}}, "text": typed}])
            ic = await c.send("complete", uri="file:///r.py", line=line, character=col + len(typed))
            await eventually(lambda: queued(2), "the edit, and its completion behind it", HANG)
            gate.set()
            edit, done = await c.reply(ie), await c.reply(ic)
    assert edit["type"] == "ok" and edit["stats"]["tokens_encoded_last_edit"] == 0 < edit["stats"]["dirty_tokens"]
    assert done["text"] == want.text and done["stats"]["tokens_encoded_last_edit"] > 0


def test_a_job_behind_a_plain_one_starts_in_the_same_gap_between_steps():
    """An edit's bookkeeping is a plain job that ends at once; the completion its connection
    queued behind it must start before the next batched step, not one step later (a whole
    step of every other editor's decode added to its first token)."""
    worker = Worker(lambda: type("Engine", (), {"model": None})(), batch=True)
    held, release, started = threading.Event(), threading.Event(), {}

    def other_editor(_engine):  # a stepper that holds the worker inside its first step
        def steps():
            yield None  # a pass-free step: waits a step out
            held.set()
            release.wait(HANG)
            yield None
        return steps()

    def edit(_engine):
        started["edit"] = worker.scheduler.steps

    def completion(_engine):
        def steps():
            started["completion"] = worker.scheduler.steps
            yield None
        return steps()

    try:
        worker.submit(other_editor, owner="a")
        assert held.wait(HANG)
        e = worker.submit(edit, owner="b")
        c = worker.submit(completion, owner="b")
        release.set()
        e.result(HANG), c.result(HANG)
    finally:
        worker.close(timeout=HANG)
    assert started == {"edit": 1, "completion": 1}
