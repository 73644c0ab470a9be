"""Live repository context through `livekv lsp` (issue 8), end to end: the real server process and
the real embedded model on a tiny workspace folder. The document edited or completed is the
active one; the other open documents and the workspace files it imports are its context groups,
encoded by the idle job and shown per group in livekv/stats' `workspace` block.

One server for the module, and the tests build on each other's state (which file is active,
which groups exist), in order.
"""
from __future__ import annotations

import pytest
import pytest_lsp
from lsprotocol import types as T
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import (MAX_NEW, change, configure, expected_completion, inline, one_thread, open_doc,
                         server_command, server_env, sha, stats)

pytestmark = pytest.mark.asyncio(loop_scope="module")

UTIL = '''WIDGET_SERIAL = "XK-4471-QZ"


def frobnicate_widgets(values, factor):
    return [v * factor for v in values]


def mean(values):
    return sum(values) / len(values)
'''
MAIN = "from pkg.util import mean\nfrom . import util\n\n\ndef report(values):\n    scaled = util.frob"
AT = (MAIN.count("\n"), len(MAIN.split("\n")[-1]))
OTHER = 'import os\n\n\ndef home():\n    return os.path.expanduser("~")\n'
FILES = {"pkg/__init__.py": '"""Widgets."""\n', "pkg/util.py": UTIL, "pkg/main.py": MAIN, "pkg/other.py": OTHER}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=server_command(), server_env=server_env()))
async def client(lsp_client: LanguageClient, root):
    folder = T.WorkspaceFolder(uri=root.as_uri(), name="repo")
    await lsp_client.initialize_session(T.InitializeParams(
        capabilities=T.ClientCapabilities(), workspace_folders=[folder],
        initialization_options={"livekv": {"maxNewTokens": MAX_NEW}}))
    yield
    await lsp_client.shutdown_session()


def uri(root, name: str) -> str:
    return (root / name).as_uri()


async def workspace(c: LanguageClient, doc: str) -> tuple[dict, dict]:
    """(the workspace block, its groups by uri), after every job sent before (idle work too)."""
    ws = (await stats(c, doc))["workspace"]
    return ws, {g["uri"]: g for g in ws["groups"]}


async def test_the_active_file_sees_the_files_it_imports(client: LanguageClient, root, engine):
    main, util = uri(root, "pkg/main.py"), uri(root, "pkg/util.py")
    open_doc(client, main, MAIN)
    ws, groups = await workspace(client, main)
    assert ws["active"] == main and ws["imports"] == [util]
    assert groups[main]["kind"] == "active" and groups[main]["source"] == "open"
    g = groups[util]
    assert g["kind"] == "context" and g["source"] == "import"
    assert g["tokens"] == len(engine.tokenizer(UTIL, add_special_tokens=False).input_ids) > 0
    assert g["dirty_tokens"] == 0, "the idle job encodes imports"
    assert g["bytes"] == g["tokens"] * ws["bytes_per_token"] > 0
    assert set(groups) == {"livekv:prefix", main, util}  # pkg/__init__.py and other.py are not imported

    # `util.frob`: the name comes from util.py. Alone, main.py does not know it.
    [item] = await inline(client, main, *AT)
    assert item.insert_text.startswith("nicate"), item.insert_text
    assert not expected_completion(engine, MAIN, *AT).startswith("nicate")


async def test_editing_another_file_makes_it_the_active_one(client: LanguageClient, root):
    main, util, other = uri(root, "pkg/main.py"), uri(root, "pkg/util.py"), uri(root, "pkg/other.py")
    open_doc(client, other, OTHER)
    ws, groups = await workspace(client, other)
    assert ws["active"] == main and groups[other]["kind"] == "context" and groups[other]["dirty_tokens"] == 0

    change(client, other, 2, ((0, 0), (0, 0), "# edited\n"))
    ws, groups = await workspace(client, other)
    assert ws["active"] == other and groups[other]["kind"] == "active"
    assert groups[main]["kind"] == "context" and groups[main]["source"] == "open"
    assert util not in groups and ws["imports"] == []  # other.py imports nothing from the workspace

    await inline(client, main, *AT)  # a completion makes main.py active again: util.py comes back
    ws, groups = await workspace(client, main)
    assert ws["active"] == main and groups[other]["kind"] == "context" and ws["imports"] == [util]
    assert groups[util]["dirty_tokens"] == 0


async def test_the_budget_evicts_the_least_recently_used_group_and_a_request_brings_it_back(
        client: LanguageClient, root):
    main, util, other = uri(root, "pkg/main.py"), uri(root, "pkg/util.py"), uri(root, "pkg/other.py")
    ws, groups = await workspace(client, main)
    assert list(groups) == ["livekv:prefix", other, util, main]  # contexts least recently used first
    budget = groups[main]["tokens"] + groups[util]["tokens"]      # no room left for other.py
    configure(client, {"livekv": {"maxCacheTokens": budget}})
    try:
        ws, groups = await workspace(client, main)
        assert ws["max_cache_tokens"] == budget and ws["tokens"] <= budget
        assert ws["evictions"] == 1 and ws["evicted"] == [other] and other not in groups and util in groups
        s = await stats(client, other)
        text = "# edited\n" + OTHER
        assert s["evicted"] and "tokens" not in s and s["text_sha256"] == sha(text)  # no cache; the text stays

        # a completion in other.py needs it: back as the active document, encoded by the request
        await inline(client, other, text.count("\n"), 0)
        s = await stats(client, other)
        ws = s["workspace"]
        assert not s["evicted"] and s["dirty_tokens"] == 0 and s["last_completion"]["steps"] > 0
        assert ws["active"] == other and ws["reencoded"] == 1 and ws["evictions"] == 2  # util.py made room
    finally:
        configure(client, {"livekv": {"maxCacheTokens": 200_000}})


async def test_an_evicted_file_under_max_prompt_ms_answers_incomplete_at_once_then_comes_back(
        client: LanguageClient, root):
    """Its re-encode would not fit the cap: the completion answers incomplete (empty) without
    starting it, and the idle job re-encodes the file, interruptibly, for the next request."""
    main, util, other = uri(root, "pkg/main.py"), uri(root, "pkg/util.py"), uri(root, "pkg/other.py")
    await inline(client, main, *AT)  # main.py active, other.py the least recently used context
    ws, groups = await workspace(client, main)
    budget = groups[main]["tokens"] + groups[util]["tokens"]
    configure(client, {"livekv": {"maxCacheTokens": budget, "maxPromptMs": 1}})
    try:
        ws, _ = await workspace(client, main)
        assert ws["evicted"] == [other] and ws["max_cache_tokens"] == budget
        text = "# edited\n" + OTHER
        assert list(await inline(client, other, text.count("\n"), 0)) == []
        s = await stats(client, other)  # behind the idle job: it has re-encoded other.py meanwhile
        assert s["last_completion"]["stop"] == "prompt_cap" and s["dirty_tokens"] == 0, s
        assert s["text_sha256"] == sha(text)
    finally:
        configure(client, {"livekv": {"maxCacheTokens": 200_000, "maxPromptMs": 0}})


async def test_a_closed_file_that_the_active_one_imports_comes_back_from_disk(client: LanguageClient, root, engine):
    main, util = uri(root, "pkg/main.py"), uri(root, "pkg/util.py")
    change(client, main, 2, ((0, 0), (0, 0), "# main\n"))       # main.py active again
    unsaved = UTIL + "\n\ndef unsaved_helper():\n    pass\n"
    open_doc(client, util, unsaved)
    ws, groups = await workspace(client, main)
    assert groups[util]["source"] == "open" and ws["imports"] == []  # open: the client's text
    client.text_document_did_close(T.DidCloseTextDocumentParams(T.TextDocumentIdentifier(util)))
    ws, groups = await workspace(client, main)
    assert groups[util]["source"] == "import" and ws["imports"] == [util] and groups[util]["dirty_tokens"] == 0
    assert groups[util]["tokens"] == len(engine.tokenizer(UTIL, add_special_tokens=False).input_ids)  # the saved text


async def test_repo_context_off_leaves_each_document_alone(client: LanguageClient, root, engine):
    main = uri(root, "pkg/main.py")
    configure(client, {"livekv": {"repoContext": False}})
    s = await stats(client, main)
    text = "# main\n" + MAIN  # moved over with its version: nothing the client sent is lost
    assert s["workspace"] is None and s["server"]["settings"]["repo_context"] is False
    assert s["text_sha256"] == sha(text) and s["lsp_version"] == 2
    [item] = await inline(client, main, AT[0] + 1, AT[1])
    assert item.insert_text == expected_completion(engine, text, AT[0] + 1, AT[1])  # util.py unseen


async def test_a_context_not_encoded_yet_is_hidden_from_the_active_document(engine):
    """In process, the state a completion meets when it interrupts the idle job before it has
    encoded a context: that group's cache slots hold nothing yet. Attending to them changes the
    answer (this model says `able` here); hidden, the answer is the file's own."""
    from livekv.lsp_server.repo_context import Grouped
    with one_thread():
        g = Grouped(engine, "pie", 200_000, [])
        main = g.open("file:///main.py", MAIN, settle=False)   # the active document, not encoded either
        util = g.open("file:///util.py", UTIL, settle=False)   # a context group
        with g.view(main):
            got = main.complete(*AT, max_new_tokens=MAX_NEW)
        assert got == expected_completion(engine, MAIN, *AT)
        assert main.sees == [g.ws.prefix, util] and util.dirty.all()  # shown again, still to encode
        encoded = ~main.dirty
        assert encoded.any() and main.stale[encoded].all()  # encoded without util.py: stale
