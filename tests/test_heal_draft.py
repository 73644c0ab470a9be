"""The healing draft (decode.py): the token that healing took back runs in the prompt's pass, in
the first decoded token's slot, so that when the model types it again the second token comes
from that same pass. It must change nothing but the number of passes: the same tokens as
without it, for FIM streams and plain documents, after edits; one pass fewer exactly when it held."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv.incremental.fim import FIM_TOKENS, FimStream

from conftest import CountingForward, excerpt, stdlib_source, tiny_llama, train_tokenizer
from lsp_helpers import ROOT, server_env

SOURCE = stdlib_source()
DOCS = [(60, 14, "pie", False), (420, 20, "lazy", False), (800, 16, "pie", True)]


@pytest.fixture(scope="module")
def engines():
    """Two tiny Llamas with the same weights, the draft on and off."""
    tok = train_tokenizer(FIM_TOKENS)
    return [tiny_llama(tok, seed=5, max_new_tokens=6, fim="off", heal_draft=d) for d in (True, False)]


def opened(eng, i: int):
    first, n, strategy, fim = DOCS[i]
    uri, text = f"file:///draft/{i}.py", excerpt(SOURCE, first, n)
    doc = FimStream.open(eng, uri, text, strategy) if fim else eng.open(uri, text, strategy=strategy)
    eng.documents[uri] = doc
    doc.edit((3, 0), (3, 0), "    total = scale(x, y)\n")
    return doc


def counted(eng, fn):
    """fn()'s value and how many forward passes it ran."""
    with CountingForward(eng.model) as fwd:
        return fn(), len(fwd.forwards)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(DOCS) - 1), st.integers(0, 40), st.floats(0, 1))
def test_the_draft_gives_the_same_tokens_and_saves_a_pass_exactly_when_it_holds(engines, d, line, frac):
    docs = [opened(eng, d) for eng in engines]
    try:
        lines = docs[0].text.split("\n")
        line = line % len(lines)
        col = round(frac * len(lines[line]))
        (on, n_on), (off, n_off) = (counted(doc.engine, lambda doc=doc: doc.suggest(line, col)) for doc in docs)
        assert (on.texts, on.ids, on.first_tokens, on.stop, on.steps) == \
               (off.texts, off.ids, off.first_tokens, off.stop, off.steps)
        assert not off.drafted
        assert n_on == n_off - on.drafted
    finally:
        for doc in docs:
            doc.engine.close(doc.uri)


def test_the_draft_holds_where_the_model_types_the_healed_token_again(engines):
    """Cursors at the end of every line of each document: the draft holds at some and not at
    others, and the answers are the same either way."""
    held = 0
    for d in range(len(DOCS)):
        docs = [opened(eng, d) for eng in engines]
        try:
            here = 0
            for line, text in enumerate(docs[0].text.split("\n")):
                on, off = (doc.suggest(line, len(text)) for doc in docs)
                assert (on.ids, on.texts) == (off.ids, off.texts)
                assert docs[0].stats["last_completion"]["drafted"] == on.drafted
                here += on.drafted
            assert (docs[0].stats["heal_drafts"], docs[1].stats["heal_drafts"]) == (here, 0)  # stats count them
            held += here
        finally:
            for doc in docs:
                doc.engine.close(doc.uri)
    assert 0 < held


def test_the_draft_shows_text_a_pass_sooner_with_the_real_model(engine):
    """SmolLM2 after an opening parenthesis types it again: the first pass's draft holds, and the
    first visible piece comes after one pass, not two."""
    doc = engine.open("file:///draft/real.py", "import os\n\n\ndef home(user):\n    return os.path.join(")
    try:
        shown_after = []
        with CountingForward(engine.model) as fwd:
            comp = doc.suggest(4, 24, on_piece=lambda p: shown_after.append(len(fwd.forwards)))
        passes = len(fwd.forwards)
        assert comp.drafted and engine.token_text(comp.first_tokens[0]) == "("
        assert comp.text and shown_after[0] == 1  # visible text after the prompt's pass alone
        assert passes == comp.steps - 1           # which also did step 0's work
    finally:
        engine.close(doc.uri)


def test_the_benchmark_compares_the_draft_with_none_on_the_same_cursors(tmp_path):
    src = tmp_path / "walk.py"
    src.write_text("import os\n\n\ndef walk(top):\n    for name in os.listdir(top):\n"
                   "        path = os.path.join(top, name)\n        if os.path.isdir(path):\n"
                   "            yield from walk(path)\n        else:\n            yield path\n")
    out = subprocess.run([sys.executable, "-m", "livekv", "bench", "heal-draft", "--file", str(src), "--every", "2",
                          "--reps", "1", "--max-new-tokens", "6", "--out", str(tmp_path)], env=server_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "heal_draft.json").read_text())
    rows = {r["cursors"]: r for r in res["rows"]}
    assert rows["all"]["n"] == 3 * rows["line end"]["n"] == len(res["completions"]) > 0
    assert all(r["same"] == r["n"] for r in rows.values())
    assert rows["line end"]["drafted"] > 0 and rows["line start"]["drafted"] == 0  # no draft of whitespace
    assert "| line end |" in out.stdout
