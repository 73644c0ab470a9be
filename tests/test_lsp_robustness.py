"""`livekv lsp` against an unlucky client: text that cannot be tokenized, an edit storm, and
settings changes afterwards. The real server over stdio (pytest-lsp), repoContext on, as shipped."""
from __future__ import annotations

import pytest
import pytest_lsp
from lsprotocol import types as T
from pytest_lsp import ClientServerConfig, LanguageClient

from conftest import excerpt, stdlib_source
from lsp_helpers import (apply, change, configure, errors, eventually, init_params, inline, open_doc,
                         server_command, server_env, sha, stats)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = excerpt(stdlib_source(), 183, 32)


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=server_command("--verify-tokens", "--max-queued", "4"),
                                                              server_env=server_env()))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(init_params())
    yield
    await lsp_client.shutdown_session()


def warnings(c) -> list[str]:
    return [m.message for m in c.log_messages if m.type == T.MessageType.Warning]


async def test_a_lone_surrogate_is_stored_as_a_replacement_and_said(client: LanguageClient):
    uri = "file:///surrogate.py"
    text = 'name = "\ud800x"\n' + TEXT
    open_doc(client, uri, text)
    s = await stats(client, uri)
    stored = text.replace("\ud800", "\ufffd")
    assert s["text_sha256"] == sha(stored) and s["replaced_surrogates"] == 1
    assert any("U+FFFD" in w and uri in w for w in warnings(client))
    change(client, uri, 2, ((0, 9), (0, 10), "y\udfff"))  # positions kept their meaning: "x" -> "y\ufffd"
    s = await stats(client, uri)
    stored = stored.replace("\ufffdx", "\ufffdy\ufffd", 1)
    assert s["lsp_version"] == 2 and s["text_sha256"] == sha(stored) and s["replaced_surrogates"] == 2
    # nothing is half open: other documents and settings changes go on
    open_doc(client, "file:///other.py", TEXT)
    configure(client, {"livekv": {"strategy": "pie-window"}})
    async def applied():
        return (await stats(client))["server"]["settings"]["strategy"] == "pie-window"
    await eventually(applied, "the strategy change")
    assert (await stats(client, uri))["text_sha256"] == sha(stored)
    assert (await stats(client, "file:///other.py"))["text_sha256"] == sha(TEXT)
    assert not [e for e in errors(client) if "surrogate" in e or "TextEncodeInput" in e]
    configure(client, {"livekv": {"strategy": "pie"}})


async def test_an_edit_storm_is_merged_and_the_completion_after_it_answered(client: LanguageClient):
    uri = "file:///storm.py"
    text = stdlib_source()[:20_000]  # ~5k tokens: each engine edit moves thousands of keys
    open_doc(client, uri, text)
    await stats(client, uri)
    line = 40
    for k in range(500):  # type a line and rub half of it out, a character per notification
        col = len(text.split("\n")[line])
        if k % 4 == 3:
            change(client, uri, k + 2, ((line, col - 1), (line, col), ""))
            text = apply(text, (line, col - 1), (line, col), "")
        else:
            ch = "abcdefghij"[k % 10]
            change(client, uri, k + 2, ((line, col), (line, col), ch))
            text = apply(text, (line, col), (line, col), ch)
    got = await inline(client, uri, line, len(text.split("\n")[line]))  # it goes on with what was typed
    s = await stats(client, uri)
    assert s["lsp_version"] == 501 and s["text_sha256"] == sha(text)
    assert s["edits"] <= 250, s["edits"]  # merged: far fewer engine edits than notifications
    assert s["server"]["idle"]["merged_changes"] >= 250
    assert got and got[0].insert_text.strip() and not errors(client)  # --verify-tokens: the tokens are a fresh tokenization's


async def test_a_newer_completion_supersedes_the_queued_ones(client: LanguageClient):
    """20 completions asked at once for one document (a client that never cancels): the 19
    older ones answer empty without costing the newest its answer."""
    import asyncio
    uri = "file:///many.py"
    open_doc(client, uri, TEXT)
    await stats(client, uri)
    line = next(i for i, s in enumerate(TEXT.split("\n")) if "def set_seq1" in s)
    col = TEXT.split("\n")[line].index("def set_seq") + len("def set_seq")
    answers = await asyncio.gather(*[inline(client, uri, line, col) for _ in range(20)])
    assert [bool(a) for a in answers] == [False] * 19 + [True], answers
    alone = await inline(client, uri, line, col)
    assert [a.insert_text for a in answers[-1]] == [a.insert_text for a in alone]


async def test_completions_for_many_files_past_the_cap_cancel_the_oldest(client: LanguageClient):
    """--max-queued 4: eight completions asked at once, each for its own file; the four oldest
    answer empty as the newer ones arrive, the four newest are answered."""
    import asyncio
    uris = [f"file:///queued{i}.py" for i in range(8)]
    for u in uris:
        open_doc(client, u, TEXT)
    await stats(client, uris[-1])
    line = next(i for i, s in enumerate(TEXT.split("\n")) if "def set_seq1" in s)
    col = TEXT.split("\n")[line].index("def set_seq") + len("def set_seq")
    answers = await asyncio.gather(*[inline(client, u, line, col) for u in uris])
    assert [bool(a) for a in answers] == [False] * 4 + [True] * 4, answers
