"""`livekv lsp` end to end: pytest-lsp drives the real server process over stdio, which loads the
real embedded model; completions are compared with the Engine's on the same final text.

Most tests share one server (module scope) and use their own document; encoding negotiation
starts its own. Cancellation, shutdown, TCP and garbage: test_lsp_lifecycle.py.
"""
from __future__ import annotations

import math

import pytest
import pytest_lsp
from lsprotocol import types as T
from pygls.exceptions import JsonRpcInvalidParams
from pytest_lsp import ClientServerConfig, LanguageClient

from livekv.incremental import Config

from conftest import excerpt, stdlib_source
from lsp_helpers import (MAX_NEW, apply, change, completion, configure, errors, eventually, expected_completion,
                         init_params, inline, open_doc, server_command, server_env, sha, start_server, stats)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = excerpt(stdlib_source(), 183, 32)  # difflib's set_seqs and set_seq1: about 250 tokens
LINES = TEXT.split("\n")


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=server_command(), server_env=server_env()))
async def client(lsp_client: LanguageClient):
    # initializationOptions override the command line's --max-new-tokens 8. repoContext off: the
    # tests' documents stay open in this shared server, and as each other's context groups their
    # completions would no longer be a fresh Engine.open's (the servers started per test keep it on)
    lsp_client.init_result = await lsp_client.initialize_session(
        init_params(options={"livekv": {"maxNewTokens": MAX_NEW, "repoContext": False}}))
    yield
    await lsp_client.shutdown_session()


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
    line, col = 0, len("    async def set_seqs(self, a, b):")
    want = expected_completion(engine, final, line, col)
    assert want, "pick a cursor where the model completes something"
    assert [i.insert_text for i in await inline(client, uri, line, col)] == [want]


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
                           (stats(client, uri, version=99), "not 99"),
                           (stats(client, "file:///nope.py"), "not open")]:
        with pytest.raises(JsonRpcInvalidParams, match=fragment):
            await call
    with pytest.raises(JsonRpcInvalidParams, match="expected"):
        await client.protocol.send_request_async("livekv/stats", {"uri": 5})

    n = len(errors(client))
    change(client, uri, 2, ((999, 0), (999, 0), "x"))                         # line out of range
    change(client, uri, 2, ((3, 4), (2, 0), "x"))                             # end before start
    change(client, uri, 2, ((0, 0), (0, 0), "ok\n"), ((99, 0), (99, 0), "x"))  # second change invalid
    change(client, "file:///nope.py", 2, ((0, 0), (0, 0), "x"))               # unknown document
    client.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier("file:///nope.py")))
    after = await stats(client, uri)
    new = errors(client)[n:]
    assert len(new) == 5, new
    assert "line 999 is outside the document" in new[0] and "before its start" in new[1]
    assert "change 2 of 2" in new[2] and "not open" in new[3] and "not open" in new[4]
    assert after["text_sha256"] == before["text_sha256"] and after["lsp_version"] == 1
    assert await inline(client, uri, 3, 8) is not None  # still serving


async def test_a_character_past_the_line_end_is_the_line_end(client: LanguageClient):
    """As vscode-languageserver-textdocument reads positions: a client that clamps (or not) never
    drifts from the server. A line past the end is still an error."""
    uri = "file:///clamp.py"
    open_doc(client, uri, TEXT)
    lines = TEXT.split("\n")
    assert lines[10] == "        self.set_seq2(b)"
    change(client, uri, 2, ((0, 500), (0, 900), "  # end"), ((10, 20), (10, 900), ""))
    want = "\n".join([lines[0] + "  # end"] + lines[1:10] + ["        self.set_seq"] + lines[11:])
    s = await stats(client, uri)
    assert s["lsp_version"] == 2 and s["text_sha256"] == sha(want)
    got = await inline(client, uri, 10, 10_000)  # completes at the line's end, and says so
    assert got and all(i.range.start.character == 20 for i in got)
    with pytest.raises(JsonRpcInvalidParams, match="outside the document"):
        await inline(client, uri, 10_000, 0)


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
    assert want, "pick a cursor where the model completes something"
    items = await inline(c, uri, 1, end)
    assert [i.insert_text for i in items] == [want]
    assert items[0].range.start == T.Position(1, end)  # back in the client's units
    items = await completion(c, uri, 1, end)
    assert [i.text_edit.new_text for i in items] == [want]
    if enc != "utf-32":  # a position inside the emoji's code units
        with pytest.raises(JsonRpcInvalidParams, match="falls inside"):
            await inline(c, uri, 1, units(line[:after_emoji - 1], enc) + 1)


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


async def test_pie_blend_is_selectable_and_stats_say_what_it_recomputed(client: LanguageClient):
    uri = "file:///blend.py"
    configure(client, {"livekv": {"strategy": "pie-blend"}})
    try:
        async def applied():
            return (await stats(client))["server"]["settings"]["strategy"] == "pie-blend"
        await eventually(applied, "the strategy change")
        open_doc(client, uri, TEXT)
        await stats(client, uri)  # encoded: the change is an edit of the cache, not of the text to encode
        change(client, uri, 2, ((2, 0), (2, 0), "    extra = compute(alpha)\n"))
        s = await stats(client, uri)
        cfg = Config()
        n, share = s["repaired_last_edit"], s["repaired_share_last_edit"]
        assert s["strategy"] == "pie-blend" and s["stale_tokens"] > 0 and n > 0 and share > 0
        stale = round(n / share)  # the stale tail the edit left, before the repair
        assert n <= min(cfg.blend_cap, math.ceil(cfg.blend_ratio * stale)) and stale > n
        assert s["tokens_encoded_last_edit"] == s["tokens_new_last_edit"] + n
        text = apply(TEXT, (2, 0), (2, 0), "    extra = compute(alpha)\n")
        line, col = 9, len(text.split("\n")[9])
        assert [i.insert_text for i in await inline(client, uri, line, col)]  # it completes
    finally:
        configure(client, {"livekv": {"strategy": "pie"}})
