"""Position groups: each group has its own position range, and an edit moves only its own group."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import torch

from livekv.incremental.groups import Workspace

from conftest import excerpt, stdlib_source

PREFIX = "# repository: demo\n"
CTX_A = excerpt(stdlib_source(json.decoder), 0, 25)
CTX_B = excerpt(stdlib_source(textwrap), 0, 20)
ACTIVE = "import json\n\n\ndef load(path):\n    with open(path) as f:\n"


def snapshot(doc):
    k, v = doc.cached()
    return k.clone(), v.clone(), doc.positions.copy()


def test_layout_and_parallel_encoding(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=1024)
    a = ws.set_context("file:///a.py", CTX_A)
    b = ws.set_context("file:///b.py", CTX_B)
    doc = ws.open("file:///main.py", ACTIVE)
    P = ws.prefix.n
    assert a.positions.tolist() == list(range(P, P + a.n)) and b.positions[0] == P  # a shared base
    assert doc.positions[0] == P + 1024 and doc.sees == [ws.prefix, a, b]
    # a context group's cache is what encoding prefix + that file alone gives: it saw nothing else
    alone = tiny_engine.open("file:///alone.py", PREFIX + CTX_A, strategy="full")
    k_alone, v_alone = alone.cached()
    k_a, v_a = a.cached()
    assert alone.token_ids[P:] == a.token_ids
    assert torch.allclose(k_a, k_alone[:, :, P:], atol=1e-5) and torch.allclose(v_a, v_alone[:, :, P:], atol=1e-5)


def test_an_edit_in_a_context_moves_no_other_group(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=1024)
    a = ws.set_context("file:///a.py", CTX_A)
    b = ws.set_context("file:///b.py", CTX_B)
    doc = ws.open("file:///main.py", ACTIVE)
    before = {d.uri: snapshot(d) for d in (ws.prefix, b, doc)}
    stats = ws.edit_context("file:///a.py", [((3, 0), (3, 0), "    extra = compute(1, 2)\n")])
    assert 0 < stats["keys_rotated_last_edit"] < a.n and stats["tokens_encoded_last_edit"] < 20
    for d in (ws.prefix, b, doc):  # untouched, bit for bit
        k, v, pos = before[d.uri]
        kk, vv = d.cached()
        assert torch.equal(k, kk) and torch.equal(v, vv) and np.array_equal(pos, d.positions)
    # inside the group it is PIE: layer-0 keys equal a fresh encode of the new text at the same base
    fresh = ws.set_context("file:///fresh.py", a.text)
    assert torch.allclose(a.cached()[0][0], fresh.cached()[0][0], atol=1e-5)
    assert doc.stats["stale_tokens"] == doc.n  # the active file saw the old context


def test_a_context_that_outgrows_the_span_moves_active_documents_by_rotation(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=64)
    doc = ws.open("file:///main.py", ACTIVE)
    k_before = doc.cached()[0][0].clone()
    encoded = doc.stats["tokens_encoded_total"]
    ws.set_context("file:///a.py", CTX_A)                   # longer than 64 tokens
    assert ws.span >= max(d.n for d in ws.contexts.values())
    assert doc.pos0 == ws.active_base and doc.stats["tokens_encoded_total"] == encoded  # not re-encoded
    fresh = ws.open("file:///fresh.py", ACTIVE)              # encoded at the new base directly
    assert torch.allclose(doc.cached()[0][0], fresh.cached()[0][0], atol=1e-5)
    assert not torch.allclose(doc.cached()[0][0], k_before)


def test_memory_budget_evicts_least_recently_used_contexts(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=1024)
    a = ws.set_context("file:///a.py", CTX_A)
    budget = ws.tokens() + 200
    ws.max_cache_tokens = budget
    ws.set_context("file:///b.py", CTX_B)
    ws.touch("file:///a.py")                                  # a is now the most recently used
    ws.set_context("file:///c.py", excerpt(stdlib_source(json.decoder), 40, 20))
    assert ws.tokens() <= budget and ws.evictions >= 1
    assert "file:///b.py" in ws.evicted and "file:///a.py" in ws.contexts
    again = ws.touch("file:///b.py")                          # re-encoded on demand
    assert again.text == CTX_B and "file:///b.py" in ws.contexts
    st = ws.stats()
    assert {g["kind"] for g in st["groups"]} == {"prefix", "context"}
    assert all(g["bytes"] == g["tokens"] * ws.kv.bytes_per_token() for g in st["groups"])


def test_completion_in_a_grouped_document_sees_the_contexts(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=1024)
    doc = ws.open("file:///main.py", ACTIVE)
    line = ACTIVE.count("\n")
    alone = doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts
    ws.set_context("file:///a.py", CTX_A)
    with_ctx = doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts
    assert alone != with_ctx  # the context's keys are attended (deterministic: seeded tiny model)
    ws.close("file:///a.py")
    assert doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts == alone


def test_switching_files_swaps_roles_by_rotation(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX, span=1024)
    a = ws.set_context("file:///a.py", CTX_A)
    main = ws.open("file:///main.py", ACTIVE)
    encoded = a.stats["tokens_encoded_total"] + main.stats["tokens_encoded_total"]
    ws.activate("file:///a.py")                                   # the person switches to a.py
    assert list(ws.active) == ["file:///a.py"] and "file:///main.py" in ws.contexts
    assert a.pos0 == ws.active_base and main.pos0 == ws.context_base and a.sees[-1] is main
    assert a.stats["tokens_encoded_total"] + main.stats["tokens_encoded_total"] == encoded  # moved, not re-encoded
    fresh = ws.set_context("file:///fresh.py", ACTIVE)            # main.py encoded as a context directly
    assert torch.allclose(main.cached()[0][0], fresh.cached()[0][0], atol=1e-5)  # positions are right
    assert a.stats["stale_tokens"] == a.n                          # it never saw main.py


def test_imports_resolve_to_workspace_files(tmp_path):
    from livekv.incremental.repo import imported_files
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "util.py", "sub/__init__.py", "sub/deep.py"):
        (pkg / f).write_text("x = 1\n")
    (tmp_path / "src" / "other").mkdir(parents=True)
    (tmp_path / "src" / "other" / "__init__.py").write_text("")
    main = pkg / "main.py"
    text = ("import os\nimport json as js\nfrom . import util\nfrom .sub.deep import x\nimport pkg.util\n"
            "from pkg.sub import deep\nimport other\nfrom .missing import y\n")
    main.write_text(text)
    got = imported_files(text, main, tmp_path)
    # from . import util -> util.py; .sub.deep (x is a name) -> deep.py; pkg.util and pkg.sub.deep
    # again; other under src/; never os or json from the standard library, nor a missing module
    assert got == [pkg / "util.py", pkg / "sub" / "deep.py", tmp_path / "src" / "other" / "__init__.py"]


def test_a_context_not_encoded_yet_is_not_attended(tiny_engine):
    ws = Workspace(tiny_engine, prefix=PREFIX)
    doc = ws.open("file:///main.py", ACTIVE)
    line = ACTIVE.count("\n")
    ws.set_context("file:///a.py", CTX_A, settle=False)   # its slots hold no K/V yet
    pending = doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts
    ws.settle()
    ready = doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts
    ws.close("file:///a.py")
    alone = doc.suggest(line, 0, max_new_tokens=3, multiline=False, n=3).texts
    assert pending == alone != ready
