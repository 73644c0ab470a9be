"""Shared context groups (incremental/shared.py, lsp_server/connection_docs.py): connections that
open the same text as context hold it once; an edit makes the editor's copy its own (copy on
write) and leaves the others' as it was; references go back to zero; a connection never sees
another's document, by uri or through a group; one budget evicts least recently used groups,
contexts first and a connection's active document last. Through the real websocket server over a
tiny random Llama, and as a hypothesis state machine over the store itself."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from websockets.asyncio.client import connect

from conftest import excerpt, stdlib_source, tiny_llama, train_tokenizer
from livekv.incremental.document import Document
from livekv.incremental.shared import SharedContexts
from livekv.lsp_server.connection_docs import SPAN, ConnectionDocs
from livekv.lsp_server.worker import Worker
from livekv.lsp_server.ws_server import BackgroundServer, ServeOptions
from ws_helpers import HANG, Client, rng

SOURCE = stdlib_source()
CTX = excerpt(SOURCE, 300, 30)
OTHER = excerpt(SOURCE, 500, 24)
DOCS = [excerpt(SOURCE, 900 + 60 * i, 20) for i in range(4)]
LINE = 9


@pytest.fixture(scope="module")
def eng():
    return tiny_llama(train_tokenizer(), seed=5, max_new_tokens=12)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def reference(eng, text: str, contexts: list[str], line: int) -> str:
    """The completion at the end of `line` of a document that sees these contexts, each in a
    cache of its own encoded from 0, the document from SPAN: what a connection should get."""
    groups = []
    for c in contexts:
        g = Document(eng, "file:///ref-ctx.py", c, "pie", kv=eng.new_cache(1024), pos0=0)
        g.settle()
        groups.append(g)
    doc = Document(eng, "file:///ref.py", text, "pie", pos0=SPAN if contexts else 0, sees=groups)
    doc.settle()
    return doc.complete(line, len(text.split("\n")[line]))


class Server:
    def __init__(self, eng, **opts):
        self.worker = Worker(lambda: eng)
        self.bg = BackgroundServer(self.worker, ServeOptions(port=0, **opts))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bg.close()
        self.worker.close(timeout=HANG)

    def store(self):
        return self.bg.server._contexts


async def opened(c: Client, ctx: dict[str, str], doc: str) -> None:
    for uri, text in ctx.items():
        assert (await c.call("open", uri=uri, text=text, role="context"))["type"] == "ok"
    assert (await c.call("open", uri="file:///mine.py", text=doc))["type"] == "ok"


async def complete(c: Client, text: str) -> str:
    r = await c.call("complete", uri="file:///mine.py", line=LINE, character=len(text.split("\n")[LINE]))
    assert r["type"] == "done" and not r["cancelled"]
    return r["text"]


async def test_a_context_that_eight_connections_share_is_held_once(eng):
    with Server(eng) as srv:
        socks = [await connect(srv.bg.url) for _ in range(8)]
        try:
            clients = [Client(w) for w in socks]
            for i, c in enumerate(clients):  # each under a name of its own: the text is what counts
                await opened(c, {f"file:///ctx{i}.py": CTX}, DOCS[i % len(DOCS)])
            st = (await clients[0].call("stats", uri="file:///mine.py"))["stats"]["workspace"]["server"]
            ctx_tokens = len(eng.mirror.tokenize(CTX)[0])
            assert st["context_groups"] == 1 and st["shared_groups"] == 1
            assert st["shared_tokens"] == ctx_tokens and st["saved_tokens"] == 7 * ctx_tokens
            got = [await complete(c, DOCS[i % len(DOCS)]) for i, c in enumerate(clients)]
            want = [reference(eng, DOCS[i % len(DOCS)], [CTX], LINE) for i in range(8)]
            assert got == want
        finally:
            for w in socks:
                await w.close()
        await asyncio.sleep(0.2)
        await asyncio.wrap_future(srv.worker.submit(lambda e: None))  # the closes ran
        store = srv.store()
        assert store.groups == [] and store.tokens() == 0  # every reference went: nothing held


async def test_connections_that_open_one_context_at_once_encode_it_once(eng):
    """Four connections open the same long context at the same moment: one encodes it, chunk by
    chunk, while the others wait for it; each is answered once it is whole."""
    big = excerpt(SOURCE, 1000, 200)
    n = len(eng.mirror.tokenize(big)[0])
    assert n > 2 * eng.config.encode_chunk  # several chunks, several steps
    with Server(eng) as srv:
        socks = [await connect(srv.bg.url) for _ in range(4)]
        try:
            clients = [Client(w) for w in socks]
            oks = await asyncio.gather(*[c.call("open", uri=f"file:///big{i}.py", text=big, role="context")
                                         for i, c in enumerate(clients)])
            for ok in oks:
                st = ok["stats"]
                assert st["dirty_tokens"] == 0 and st["tokens"] == n
                assert st["tokens_encoded_total"] == n  # encoded once, not once per connection
                assert st["workspace"]["server"]["context_groups"] == 1
        finally:
            for w in socks:
                await w.close()


async def test_an_edit_copies_the_editors_context_and_leaves_the_others(eng):
    with Server(eng) as srv:
        async with connect(srv.bg.url) as wa, connect(srv.bg.url) as wb:
            a, b = Client(wa), Client(wb)
            await opened(a, {"file:///ctx.py": CTX}, DOCS[0])
            await opened(b, {"file:///ctx.py": CTX}, DOCS[1])
            before_b = await complete(b, DOCS[1])
            edit = await a.call("edit", uri="file:///ctx.py", version=1, changes=[{"range": rng(2, 0), "text": "limit = 10\n"}])
            assert edit["type"] == "ok"
            edited = "\n".join(CTX.split("\n")[:2] + ["limit = 10"] + CTX.split("\n")[2:])
            sa = (await a.call("stats", uri="file:///ctx.py"))["stats"]
            sb = (await b.call("stats", uri="file:///ctx.py"))["stats"]
            assert sa["text_sha256"] == sha(edited) and sb["text_sha256"] == sha(CTX)
            assert sa["workspace"]["server"]["shared_groups"] == 0 and sa["workspace"]["server"]["context_groups"] == 2
            assert await complete(b, DOCS[1]) == before_b == reference(eng, DOCS[1], [CTX], LINE)
            assert await complete(a, DOCS[0]) == reference(eng, DOCS[0], [edited], LINE)
            # a third connection with the original text shares the original, not a's copy
            async with connect(srv.bg.url) as wc:
                c = Client(wc)
                await opened(c, {"file:///c.py": CTX}, DOCS[2])
                st = (await c.call("stats", uri="file:///c.py"))["stats"]["workspace"]
                assert st["contexts"]["file:///c.py"]["shared"] and st["server"]["shared_groups"] == 1


async def test_a_connection_never_sees_anothers_document(eng):
    with Server(eng) as srv:
        async with connect(srv.bg.url) as wa, connect(srv.bg.url) as wb:
            a, b = Client(wa), Client(wb)
            await opened(a, {"file:///secret.py": OTHER}, DOCS[0])
            await opened(b, {}, DOCS[1])
            for uri in ("file:///secret.py", "file:///nothing.py"):  # a's context, by its uri: unknown to b
                err = await b.reply(await b.send("stats", uri=uri))
                assert err["type"] == "error" and err["code"] == "unknown_uri"
            sb = (await b.call("stats", uri="file:///mine.py"))["stats"]
            assert sb["text_sha256"] == sha(DOCS[1]) and sb["workspace"]["contexts"] == {}
            assert await complete(b, DOCS[1]) == reference(eng, DOCS[1], [], LINE)  # nothing of a's in it
            assert await complete(a, DOCS[0]) == reference(eng, DOCS[0], [OTHER], LINE)


async def test_one_budget_evicts_contexts_first_and_the_active_document_last(eng):
    n_ctx, n0, n1 = (len(eng.mirror.tokenize(t)[0]) for t in (CTX, DOCS[0], DOCS[1]))
    budget = n_ctx + n0 + n1 - 1  # all three do not fit; any two do
    with Server(eng, max_cache_tokens=budget) as srv:
        async with connect(srv.bg.url) as wa, connect(srv.bg.url) as wb:
            a, b = Client(wa), Client(wb)
            await opened(a, {"file:///ctx.py": CTX}, DOCS[0])
            await complete(a, DOCS[0])                      # a's active document
            await opened(b, {}, DOCS[1])                    # over budget: the context goes first
            sa = (await a.call("stats", uri="file:///mine.py"))["stats"]
            assert sa["workspace"]["contexts"]["file:///ctx.py"]["evicted"] and not sa["evicted"]
            assert sa["workspace"]["server"]["evictions"] >= 1
            assert sa["workspace"]["server"]["tokens"] <= budget
            # b's activity does not take a's active document; a's next edit brings its context back
            await complete(b, DOCS[1])
            assert not (await a.call("stats", uri="file:///mine.py"))["stats"]["evicted"]
            # a's next completion brings its context back first: the answer is as if never evicted
            assert await complete(a, DOCS[0]) == reference(eng, DOCS[0], [CTX], LINE)
            assert not (await a.call("stats", uri="file:///ctx.py"))["stats"]["evicted"]
            await a.call("edit", uri="file:///ctx.py", version=1, changes=[{"range": rng(0, 0), "text": "#\n"}])
            sa = (await a.call("stats", uri="file:///ctx.py"))["stats"]
            assert not sa["evicted"] and sa["text_sha256"] == sha("#\n" + CTX)


class StoreMachine(RuleBasedStateMachine):
    """Connections open, edit and close context files of a few texts in random order: each
    connection's view holds the text it should, every group's references are the views that
    hold it, and everything goes when every connection has."""

    @initialize()
    def setup(self):
        self.eng = ENGINE
        self.store = SharedContexts(self.eng, max_cache_tokens=10**6)
        self.views = [ConnectionDocs(self.eng, "pie", self.store, prefix=f"m{i}:") for i in range(3)]
        self.model: list[dict[str, str]] = [{} for _ in self.views]   # what each connection should see

    @rule(v=st.integers(0, 2), name=st.sampled_from(["a.py", "b.py"]), text=st.sampled_from([CTX[:300], OTHER[:300]]))
    def open_context(self, v, name, text):
        self.views[v].open(name, text, settle=False, role="context")
        self.model[v][name] = text

    @rule(v=st.integers(0, 2), name=st.sampled_from(["a.py", "b.py"]), at=st.integers(0, 3))
    def edit_context(self, v, name, at):
        if name not in self.model[v]:
            return
        doc = self.views[v].activate(name)
        doc.edit((at, 0), (at, 0), "z = 0\n", settle=False)
        lines = self.model[v][name].split("\n")
        self.model[v][name] = "\n".join(lines[:at] + ["z = 0"] + lines[at:])

    @rule(v=st.integers(0, 2), name=st.sampled_from(["a.py", "b.py"]))
    def close_context(self, v, name):
        if name in self.model[v]:
            self.views[v].close(name)
            del self.model[v][name]

    @invariant()
    def views_hold_their_own_texts(self):
        for view, want in zip(self.views, self.model):
            assert {u: view.text(u) for u in view.contexts} == want

    @invariant()
    def references_are_the_names_that_hold_a_group(self):
        for g in self.store.groups:
            holders = sum(h is g for view in self.views for h in view.contexts.values())
            assert g.refs == holders >= 1  # one per name a connection holds it under
        texts = [g.text for g in self.store.groups if g.key is not None]
        assert len(texts) == len(set(texts))  # one shareable group per text

    def teardown(self):
        for view in self.views:
            view.clear()
        assert self.store.groups == [] and self.store.tokens() == 0


ENGINE = None


def test_references_go_back_to_zero_under_any_sequence(eng):
    global ENGINE
    ENGINE = eng
    StoreMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=12, deadline=None,
                                              suppress_health_check=[HealthCheck.function_scoped_fixture])
    StoreMachine.TestCase().runTest()
