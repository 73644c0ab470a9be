"""The completion experience through `livekv lsp` (issue 9), end to end: pytest-lsp drives the
real server process, which runs the real embedded model. Typed-ahead reuse, prefetch, the time
caps and batched candidates (syntax-aware stops: test_lsp_stops.py), each checked on the server's counters
(livekv/stats: decode steps, reuse hits, cap flags), never on timings.

One server for the module; each test uses its own documents and restores the settings it changes.
"""
from __future__ import annotations

import pytest
from lsprotocol import types as T
from pytest_lsp import LanguageClient

from conftest import stdlib_source
from experience import MAX_NEW, client, restore, texts  # noqa: F401 (client: the module's server)
from lsp_helpers import change, completion_list, configure, eventually, expected_completion, inline, open_doc, stats

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADD = "def add(a, b):\n    result = "            # the model answers "a + b", then "\n    return result"
AT = (1, len("    result = "))
COUNTING = "numbers = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, "  # the model keeps counting: a long line
PERSON = "class Person:\n    def __init__(self, name, age, email):"  # a block of assignments, then a dedent
OPEN_HEADER = PERSON[:-2]                                             # the same, before "):" is typed


# -- typed-ahead reuse and prefetch --------------------------------------------------------------
async def test_typing_the_suggestion_returns_its_rest_without_a_model_call(client: LanguageClient):
    uri = "file:///typeahead.py"
    open_doc(client, uri, ADD)
    [shown] = texts(await inline(client, uri, *AT))
    s = await stats(client, uri)  # waits for the prefetch queued after the reply
    assert len(shown) >= 3 and s["last_completion"]["steps"] > 0 and not s["last_completion"]["reused"], s
    assert s["last_prefetch"]["text"], "the next line was prefetched (and must not leak into the rest)"
    hits, reparses = s["reuse_hits"], s["syntax_reparses"]

    change(client, uri, 2, (AT, AT, shown[:2]))  # the person types the first two characters
    assert texts(await inline(client, uri, AT[0], AT[1] + 2)) == [shown[2:]]
    s = await stats(client, uri)
    last = s["last_completion"]
    assert last["reused"] and last["steps"] == 0 and last["decodes"] == 0 and last["stop"] == "typed_ahead", last
    assert s["reuse_hits"] == hits + 1

    # typing something else drops the suggestion: the next request decodes
    other = "Z" if shown[2] != "Z" else "Q"
    change(client, uri, 3, ((AT[0], AT[1] + 2), (AT[0], AT[1] + 2), other))
    await inline(client, uri, AT[0], AT[1] + 3)
    s = await stats(client, uri)
    assert not s["last_completion"]["reused"] and s["last_completion"]["steps"] > 0 and s["reuse_hits"] == hits + 1
    # two edits, then one decode: the syntax tree was edited and reparsed once, incrementally
    assert s["syntax_reparses"] == reparses + 1, s["syntax_reparses"]


async def test_prefetch_answers_the_next_line_after_tab(client: LanguageClient, engine):
    uri = "file:///prefetch.py"
    open_doc(client, uri, ADD)
    [shown] = texts(await inline(client, uri, *AT))
    s = await stats(client, uri)
    nxt = s["last_prefetch"]["text"]
    assert nxt.startswith("\n") and nxt.strip(), s["last_prefetch"]  # the line after the accepted one
    assert s["server"]["idle"]["prefetched"] >= 1
    hits = s["reuse_hits"]

    change(client, uri, 2, (AT, AT, shown))  # Tab: the editor inserts the suggestion
    after = (AT[0], AT[1] + len(shown))
    assert texts(await inline(client, uri, *after)) == [nxt]
    s = await stats(client, uri)
    assert s["last_completion"]["reused"] and s["last_completion"]["steps"] == 0 and s["reuse_hits"] == hits + 1
    # and it is what the model says there
    accepted = ADD + shown
    assert nxt == expected_completion(engine, accepted, *after, n=MAX_NEW)

    # prefetch off: the same steps decode
    configure(client, {"livekv": {"prefetch": False}})
    try:
        uri = "file:///no-prefetch.py"
        open_doc(client, uri, ADD)
        assert texts(await inline(client, uri, *AT)) == [shown]
        assert (await stats(client, uri))["last_prefetch"] is None
        change(client, uri, 2, (AT, AT, shown))
        assert texts(await inline(client, uri, *after)) == [nxt]
        last = (await stats(client, uri))["last_completion"]
        assert not last["reused"] and last["steps"] > 0, last
    finally:
        restore(client)


async def test_an_edit_or_a_request_cancels_a_running_prefetch(client: LanguageClient):
    # the answer closes the header ("):"), so the prefetched next "line" is the block that header
    # opens: up to maxLines lines and 48 tokens of decoding, unless something arrives
    configure(client, {"livekv": {"maxNewTokens": 48}})
    uri, end = "file:///prefetch-cancel.py", (1, len(OPEN_HEADER.split("\n")[1]))
    open_doc(client, uri, OPEN_HEADER)
    other = "file:///prefetch-other.py"
    open_doc(client, other, ADD)
    try:
        for version, interrupt in [(2, "edit"), (3, "request")]:
            before = (await stats(client, uri))["server"]["idle"]["prefetch_cancelled"]
            assert texts(await inline(client, uri, *end))
            await eventually(lambda: prefetching(client), "the prefetch to start")
            if interrupt == "edit":
                change(client, uri, version, ((0, 0), (0, 0), "# edited\n"))
                end = (2, end[1])
            else:
                await inline(client, other, *AT)
            s = await stats(client, uri)
            assert s["last_prefetch"]["stop"] == "cancelled" and s["last_prefetch"]["steps"] < 48, s["last_prefetch"]
            assert s["server"]["idle"]["prefetch_cancelled"] == before + 1
    finally:
        restore(client)


async def prefetching(c: LanguageClient) -> bool:
    return (await stats(c))["server"]["idle"]["prefetching"]


# -- strategies over LSP -------------------------------------------------------------------------
MIDDLE = "".join(stdlib_source().splitlines(keepends=True)[100:160])  # 60 lines of difflib.py


async def under(c: LanguageClient, strategies, run) -> dict:
    """{strategy: await run(uri)} for MIDDLE opened (and encoded) under each strategy in turn;
    the strategy goes back to pie afterwards."""
    out = {}
    try:
        for strategy in strategies:
            configure(c, {"livekv": {"strategy": strategy}})
            uri = f"file:///{strategy}.py"
            open_doc(c, uri, MIDDLE)
            assert (await stats(c, uri))["dirty_tokens"] == 0  # encoded before any edit
            out[strategy] = await run(uri)
            c.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier(uri)))
    finally:
        configure(c, {"livekv": {"strategy": "pie"}})
    return out


async def test_pie_refresh_re_encodes_stale_tokens_while_idle(client: LanguageClient):
    """An edit leaves the suffix stale; with pie-refresh the idle job re-encodes it (pie does not)."""
    async def edit(uri):
        before = (await stats(client, uri))["server"]["idle"]["tokens_refreshed"]
        change(client, uri, 2, ((5, 0), (5, 0), "import os\n"))
        s = await stats(client, uri, version=2)  # queued behind the idle job
        return s["stale_tokens"], s["server"]["idle"]["tokens_refreshed"] - before, s["tokens"]

    got = await under(client, ("pie", "pie-refresh"), edit)
    (pie_stale, pie_refreshed, n), (stale, refreshed, _) = got["pie"], got["pie-refresh"]
    assert pie_stale > 100 and pie_refreshed == 0
    assert stale == 0 and refreshed > 100 - 32 and refreshed <= n


async def test_lazy_through_the_server_answers_as_pie_without_rotating(client: LanguageClient):
    """Strategy lazy, set over LSP: mid-file edits record deltas instead of rotating keys, and
    the suggestion after them is pie's."""
    async def edit_and_complete(uri):
        change(client, uri, 2, ((5, 0), (5, 0), "import os\n"), ((30, 0), (31, 0), ""))
        items = await inline(client, uri, 40, 0)
        s = await stats(client, uri, version=2)
        return [i.insert_text for i in items], s["keys_rotated_total"], s["pending_keys"]

    got = await under(client, ("pie", "lazy"), edit_and_complete)
    (pie_text, pie_rotated, _), (text, rotated, pending) = got["pie"], got["lazy"]
    assert pie_rotated > 0 and rotated == 0 and pending > 0
    assert text == pie_text and text, got


# -- time caps ---------------------------------------------------------------------------------
async def test_prompt_cap_answers_incomplete_and_the_update_finishes_in_the_background(client: LanguageClient,
                                                                                      engine):
    configure(client, {"livekv": {"maxPromptMs": 50}})
    uri = "file:///paste.py"
    open_doc(client, uri, "import difflib\n")
    try:
        base = await stats(client, uri)
        paste = stdlib_source()[:20000]
        assert len(engine.tokenizer(paste).input_ids) >= 5000
        change(client, uri, 2, ((1, 0), (1, 0), paste))  # a large paste, then asking at once
        lines = ("import difflib\n" + paste).split("\n")
        end = (len(lines) - 1, len(lines[-1]))
        assert list(await inline(client, uri, *end)) == []
        res = await completion_list(client, uri, *end)
        assert res.is_incomplete and list(res.items) == []
        # livekv/stats without a uri is answered at once, beside the worker: the update goes on
        idle = (await stats(client))["server"]["idle"]

        async def encoding():
            now = (await stats(client))["server"]["idle"]
            return now["running"] and now["tokens_encoded"] > idle["tokens_encoded"]
        await eventually(encoding, "the background update to make progress")
        # a newer edit interrupts it: keep only the paste's last 30 lines (not encoded yet)
        keep = len(lines) - 31
        change(client, uri, 3, ((1, 0), (keep, 0), ""))
        s = await stats(client, uri, version=3)  # queued behind the background update
        assert s["dirty_tokens"] == 0, "the background update finished"
        assert s["server"]["idle"]["interrupted"] > idle["interrupted"]
        assert s["server"]["idle"]["tokens_encoded"] > idle["tokens_encoded"] + 100
        assert s["prompt_caps"] == base["prompt_caps"] + 2
        last = s["last_completion"]
        assert last["incomplete"] and last["stop"] == "prompt_cap" and last["steps"] == 0, last
        print(f"\npaste then a completion: answered incomplete twice; "
              f"{s['server']['idle']['tokens_encoded'] - idle['tokens_encoded']} tokens encoded in the background since")

        await inline(client, uri, end[0] - keep + 1, end[1])  # now up to date: a real answer
        last = (await stats(client, uri))["last_completion"]
        assert not last["incomplete"] and last["steps"] > 0, last
    finally:
        client.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier(uri)))
        restore(client)


async def test_predict_cap_returns_a_partial_line(client: LanguageClient):
    open_doc(client, "file:///free.py", ADD)
    [free] = texts(await inline(client, "file:///free.py", *AT))
    steps = (await stats(client, "file:///free.py"))["last_completion"]["steps"]
    configure(client, {"livekv": {"maxPredictMs": 1}})  # less than one decode step
    try:
        uri = "file:///capped.py"
        open_doc(client, uri, ADD)
        [capped] = texts(await inline(client, uri, *AT))
        s = await stats(client, uri)
        last = s["last_completion"]
        assert last["capped"] and last["stop"] == "predict_cap" and last["steps"] < steps, (last, steps)
        assert s["predict_caps"] == 1
        assert free.startswith(capped) and len(capped) < len(free), (capped, free)  # cut at a token boundary
    finally:
        restore(client)


# -- candidates --------------------------------------------------------------------------------
async def test_candidates_come_from_one_batched_decode(client: LanguageClient):
    configure(client, {"livekv": {"candidates": 3, "maxNewTokens": 6, "prefetch": False}})
    end = (0, len(COUNTING))
    try:
        one, three = "file:///k1.py", "file:///k3.py"
        open_doc(client, one, COUNTING)
        open_doc(client, three, COUNTING)
        assert (await stats(client, one))["dirty_tokens"] == 0  # both encoded: the decodes alone are measured
        # typing (an automatic trigger) gets one suggestion; a manual trigger gets `candidates`
        [single] = texts(await inline(client, one, *end, manual=False))
        k1 = (await stats(client, one))["last_completion"]
        items = texts(await inline(client, three, *end))
        k3 = (await stats(client, three))["last_completion"]
        assert k1["prefix_tokens"] == k3["prefix_tokens"] and k1["tail_tokens"] == k3["tail_tokens"]
        assert len(items) == 3 and len(set(items)) == 3 and items[0] == single, items
        assert k3["candidates"] == 3 and k3["decodes"] == 1, k3  # one decode for the three
        # one forward pass per step for all three: k = 1 runs to maxNewTokens, k = 3 no longer
        assert k1["steps"] == 6 and k3["steps"] <= k1["steps"], (k1, k3)
        print(f"\nk=3 vs k=1: total_ms {k3['total_ms']:.0f} / {k1['total_ms']:.0f} = "
              f"{k3['total_ms'] / k1['total_ms']:.2f}x, decode steps {k3['steps']} / {k1['steps']} = "
              f"{k3['steps'] / k1['steps']:.2f}x")
    finally:
        restore(client)
