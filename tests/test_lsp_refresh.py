"""`livekv/refresh` (issue 17 §8, "the first suggestion is not lost"): a completion the server had
to answer empty, because it was asked while the model loaded and the file had not been encoded
(under maxPromptMs), is followed, once the server has encoded the file, by one notification
`livekv/refresh` {"uri"}; asking again then gets the real suggestion. Each test starts its own
real server, so the model is still loading when the first request arrives."""
from __future__ import annotations

import pytest
from lsprotocol import types as T

from conftest import excerpt, stdlib_source
from lsp_helpers import (change, completion, completion_list, eventually, expected_completion, open_doc, start_server,
                         stats)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = excerpt(stdlib_source(), 183, 90)  # difflib's SequenceMatcher setters: about 700 tokens
LINES = TEXT.split("\n")
AT = (LINES.index("        self.fullbcount = None"), len("        self.fullbcount = None"))  # ~450 tokens in
REFRESH = "livekv/refresh"
# a cap the first encode of the file cannot meet (the server estimates 1 ms a token before it has
# encoded anything); a completion with nothing left to encode meets it easily
OPTIONS = {"livekv": {"maxPromptMs": 100, "maxNewTokens": 6, "repoContext": False}}


async def refreshing_server():
    c, _ = await start_server(options=OPTIONS)
    got: list[str] = []

    @c.feature(REFRESH)
    def refreshed(params):
        got.append(params.uri if hasattr(params, "uri") else params["uri"])
    return c, got


async def test_a_completion_asked_while_the_model_loads_is_refreshed_once_the_file_is_encoded(engine):
    c, got = await refreshing_server()
    uri = "file:///first.py"
    try:
        # at once after initialize: the worker is still loading the model, and then has all
        # ~450 tokens before the cursor to encode, too many for maxPromptMs
        open_doc(c, uri, TEXT)
        first = await completion_list(c, uri, *AT)
        assert first.is_incomplete and list(first.items) == [], first
        s = await stats(c, uri)  # behind the idle work that encodes the file
        assert s["last_completion"]["stop"] == "prompt_cap", s["last_completion"]

        async def refreshed():
            return got
        await eventually(refreshed, f"{REFRESH} for {uri}", timeout=120)  # a hang guard, not a timing
        assert got == [uri]
        [item] = await completion(c, uri, *AT)
        assert item.insert_text == expected_completion(engine, TEXT, *AT, n=6) and item.insert_text

        # answered for real: nothing is owed, and no second refresh comes
        s = await stats(c, uri)
        assert s["last_completion"]["stop"] != "prompt_cap" and s["server"]["refresh"] == {"pending": [], "sent": 1}
        assert got == [uri]
    finally:
        await c.shutdown_session()
        await c.stop()


async def test_no_refresh_for_an_answer_given_nor_for_a_closed_document():
    c, got = await refreshing_server()
    uri, other = "file:///warm.py", "file:///closed.py"
    try:
        open_doc(c, uri, TEXT)
        await stats(c, uri)  # its first encode done: nothing left to encode before the cursor
        [item] = await completion(c, uri, *AT)
        assert item.insert_text
        # a paste too big for maxPromptMs: answered empty, a miss; closed before it is encoded
        open_doc(c, other, "")
        change(c, other, 2, ((0, 0), (0, 0), TEXT * 3))
        assert list((await completion_list(c, other, *AT)).items) == []
        assert (await stats(c))["server"]["refresh"]["pending"] == [other]  # answered at once
        c.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier(other)))
        s = await stats(c, uri)  # behind the idle work queued after each of them
        assert s["server"]["refresh"] == {"pending": [], "sent": 0} and got == []
    finally:
        await c.shutdown_session()
        await c.stop()
