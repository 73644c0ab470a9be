"""Where suggestions end, through `livekv lsp`: a block after a block-opening colon, brackets the
rest of the line closes left to it, and settings checked before they apply. One real server
for the module (experience.py)."""
from __future__ import annotations

import ast

import pytest
from lsprotocol import types as T
from pytest_lsp import LanguageClient

import livekv.incremental.stops
from experience import MAX_NEW, client, restore, texts  # noqa: F401 (client: the module's server)
from lsp_helpers import configure, eventually, expected_completion, inline, one_thread, open_doc, stats

pytestmark = pytest.mark.asyncio(loop_scope="module")

PERSON = "class Person:\n    def __init__(self, name, age, email):"  # a block of assignments, then a dedent
OPEN_HEADER = PERSON[:-2]                                             # the same, before "):" is typed
HEADER = (1, len(PERSON.split("\n")[1]))


# -- syntax-aware stops ------------------------------------------------------------------------
async def test_a_block_header_gets_the_block_up_to_the_dedent_within_max_lines(client: LanguageClient):
    configure(client, {"livekv": {"maxNewTokens": 40, "prefetch": False}})
    try:
        full = await block(client, "file:///block8.py")
        body = full.split("\n")[1:]
        assert full.startswith("\n") and 2 <= len(body) < 8, full
        assert all(line.startswith("        ") for line in body), full  # deeper than the def
        last = (await stats(client, "file:///block8.py"))["last_completion"]
        assert last["mode"] == "block" and last["stop"] == "block_end", last  # fewer than maxLines: the dedent

        configure(client, {"livekv": {"maxLines": 2}})
        two = await block(client, "file:///block2.py")
        assert two == "\n".join(full.split("\n")[:3])  # the same block, cut after two lines

        configure(client, {"livekv": {"multiline": False}})
        one = await block(client, "file:///line.py")
        assert one == "\n".join(full.split("\n")[:2])  # only the next line
        assert (await stats(client, "file:///line.py"))["last_completion"]["mode"] == "line"
    finally:
        restore(client)


async def block(c: LanguageClient, uri: str) -> str:
    open_doc(c, uri, PERSON)
    [text] = texts(await inline(c, uri, *HEADER))
    return text


async def test_a_suggestion_inside_a_call_closes_no_more_brackets_than_are_open(client: LanguageClient, engine,
                                                                             monkeypatch):
    head = "def show(items):\n    print(len(items))\n"
    # the cursor at the end of an open call: the suggestion closes at most what is open
    uri = "file:///open-call.py"
    open_doc(client, uri, head + "    print(len(")
    [closing] = texts(await inline(client, uri, 2, len("    print(len(")))
    assert closing.count(")") <= 2
    ast.parse("print(len(" + closing)  # the statement is complete and balanced

    # the editor closed the brackets already (`print(len(|))`): the suggestion closes none of them
    uri = "file:///auto-closed.py"
    open_doc(client, uri, head + "    print(len())\n")
    [inside] = texts(await inline(client, uri, 2, len("    print(len(")))
    ast.parse("print(len(" + inside + "))")
    assert ")" not in inside, inside
    assert ")" not in expected_completion(engine, head + "    print(len())\n", 2, len("    print(len("), MAX_NEW), \
        "the engine leaves brackets the rest of the line closes to it, as the server does"

    # the decode stops inside a bracket it opened (maxNewTokens): trimmed to the last balanced point
    configure(client, {"livekv": {"maxNewTokens": 3}})
    try:
        uri, text = "file:///cut-call.py", head + "    x = "
        open_doc(client, uri, text)
        [cut] = texts(await inline(client, uri, 2, 8))
        with one_thread(), monkeypatch.context() as m:  # what the model decoded, untrimmed
            m.setattr(livekv.incremental.stops, "balanced_prefix", lambda text, context: text)
            raw = expected_completion(engine, text, 2, 8, 3)
        assert raw.count("(") > raw.count(")") and raw.startswith(cut) and len(cut) < len(raw), (raw, cut)
        assert cut.count("(") == cut.count(")"), cut
    finally:
        restore(client)


async def test_fitting_a_suggestion_to_the_rest_of_the_line():
    # async only to share the module's event loop mark; no server needed
    from livekv.incremental.stops import Brackets
    from livekv.incremental.stops import fit_to_line

    def fit(before: str, text: str, rest: str) -> str:
        context = Brackets()
        context.feed(before)
        return fit_to_line(context, text, rest)
    assert fit("print(len(", "items))", "))") == "items"
    assert fit("print(len(", "items))", ")") == "items)"          # one closed by the editor, one left
    assert fit("print(len(", "items))", "") == "items))"          # nothing after the cursor: untouched
    assert fit('print("', 'hello")', '")') == "hello"               # an auto-closed string
    assert fit("f(", "a, g(b)", ")") == "a, g(b)"                  # its own brackets are fine
    assert fit("x = [", "1, 2], y", "]") == "1, 2"                 # never more than the editor left open


async def test_settings_are_checked(client: LanguageClient):
    n = len(client.messages)
    for bad in ({"candidates": 9}, {"candidates": 0}, {"prefetch": "yes"}, {"maxPromptMs": -1},
                {"maxLines": 0}, {"multiline": 1}, {"maxPredictMs": 1.5}, {"maxCacheTokens": 0},
                {"repoContext": "yes"}):
        configure(client, {"livekv": bad})
    await eventually(lambda: settled(client, n, 9), "every refusal")
    settings = (await stats(client))["server"]["settings"]
    assert {k: settings[k] for k in ("candidates", "prefetch", "max_prompt_ms", "max_predict_ms", "max_lines",
                                     "multiline", "max_cache_tokens", "repo_context")} == dict(
        candidates=1, prefetch=True, max_prompt_ms=0, max_predict_ms=0, max_lines=8, multiline=True,
        max_cache_tokens=200_000, repo_context=False)


async def settled(c: LanguageClient, n: int, count: int) -> bool:
    refused = [m.message for m in c.messages[n:] if m.type == T.MessageType.Error]
    assert all("refused" in m and "old settings stay" in m for m in refused), refused
    return len(refused) == count
