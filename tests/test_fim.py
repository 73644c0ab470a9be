"""FIM as a token stream, on a tiny random Llama whose tokenizer has the FIM tokens: the cache
must be exactly the PSM prompt's, and moving the cursor must be a splice, not a rebuild."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv.incremental.fim import FimStream

from conftest import excerpt, stdlib_source

TEXT = excerpt(stdlib_source(), 100, 24)


def psm_ids(eng, doc, g):
    pre, suf, mid = eng.fim_ids
    ids = doc.token_ids
    return [pre] + ids[:g] + [suf] + ids[g:], mid


def stream_kv(doc):
    """The stream's K/V in PSM order: prefix marker, prefix, suffix marker, suffix."""
    f, kv, g = doc.prompt, doc.kv, doc.prompt.gap
    slots = [f.prefix_marker.slot0] + list(range(doc.slot0, doc.slot0 + g)) + [f.suffix_marker.slot0] + \
        list(range(doc.slot0 + g, doc.slot0 + doc.n))
    idx = torch.tensor(slots)
    return kv.k[:, :, idx], kv.v[:, :, idx]


def test_a_rebuilt_stream_is_exactly_the_psm_prompt(fim_engine):
    c = TEXT.index("\n", len(TEXT) // 2) + 1
    doc = FimStream.open(fim_engine, "file:///r.py", TEXT, "pie", gap_at=c)
    assert 0 < doc.prompt.gap < doc.n
    seq, _ = psm_ids(fim_engine, doc, doc.prompt.gap)
    with torch.inference_mode():
        out = fim_engine.model.hf(torch.tensor([seq]), use_cache=True)
    k, v = stream_kv(doc)
    for layer in range(fim_engine.model.n_layers):
        ref = out.past_key_values.layers[layer]
        assert torch.allclose(k[layer], ref.keys[0], atol=1e-5), layer
        assert torch.allclose(v[layer], ref.values[0], atol=1e-5), layer
    assert doc.positions.tolist() == [1 + i + (i >= doc.prompt.gap) for i in range(doc.n)]


def test_moving_the_cursor_is_a_splice_not_a_rebuild(fim_engine):
    doc = fim_engine.open("file:///s.py", TEXT)
    doc.configure(fim_window=0)  # the suffix's start as far as refresh_window only (see below)
    assert isinstance(doc.prompt, FimStream) and doc.prompt.gap == doc.n
    line = TEXT.count("\n") // 2
    c = doc.offset(line, 0)
    encoded = doc.stats["tokens_encoded_total"]
    doc.complete(line, 0)
    g = doc.prompt.gap
    w = fim_engine.config.refresh_window   # only the windows after the new gap and before the old
    assert 0 < doc.stats["tokens_encoded_total"] - encoded <= 2 * w  # (the end of the file)
    rebuilt = FimStream.open(fim_engine, "file:///rb.py", doc.text, "pie", gap_at=c)
    assert rebuilt.prompt.gap == g
    k, _ = stream_kv(doc)
    k_ref, _ = stream_kv(rebuilt)
    assert torch.allclose(k[0], k_ref[0], atol=1e-5)          # layer 0: positions are right
    # the rest of the suffix never saw the marker (the end, encoded again after it, read stale text)
    assert doc.stats["stale_tokens"] == doc.n - g - w
    # an edit before the gap moves the gap with the text and asks for the marker again
    doc.edit((1, 0), (1, 0), "    extra = 1\n")
    assert doc.prompt.gap > g and doc.prompt.marker_dirty
    doc.complete(line + 1, 0)
    assert not doc.prompt.marker_dirty
    fresh = FimStream.open(fim_engine, "file:///f2.py", doc.text, "pie", gap_at=doc.offset(line + 1, 0))
    assert torch.allclose(stream_kv(doc)[0][0], stream_kv(fresh)[0][0], atol=1e-5)



def test_moving_the_cursor_down_re_encodes_the_text_that_became_prefix(fim_engine):
    """Moving the cursor down a line turns that line from suffix into prefix: encoded after the
    marker, it would still read as text after the cursor. Within refresh_window of the gap it is
    encoded again, so the prefix is exactly the rebuilt prompt's, every layer."""
    c = TEXT.index("\n", len(TEXT) // 2) + 1
    line = TEXT[:c].count("\n") + 1  # a line below the gap's
    doc = FimStream.open(fim_engine, "file:///down.py", TEXT, "pie", gap_at=c)
    try:
        old = doc.prompt.gap
        doc.complete(line, 0)
        g = doc.prompt.gap
        assert 0 < g - old <= fim_engine.config.refresh_window and not doc.stale[:g].any()
        rebuilt = FimStream.open(fim_engine, "file:///down-rb.py", doc.text, "pie", gap_at=doc.offset(line, 0))
        assert rebuilt.prompt.gap == g
        (k, v), (kr, vr) = stream_kv(doc), stream_kv(rebuilt)
        assert torch.allclose(k[:, :, : g + 1], kr[:, :, : g + 1], atol=1e-5)  # marker and prefix
        assert torch.allclose(v[:, :, : g + 1], vr[:, :, : g + 1], atol=1e-5)
        fim_engine.close(rebuilt.uri)
    finally:
        fim_engine.close(doc.uri)


def test_a_far_move_re_encodes_the_text_around_the_old_cursor(fim_engine):
    """The text right after the old marker was encoded as the suffix's first tokens, the place to
    fill; after a move far down it is prefix and would still read as the cursor's place. It is
    encoded again within refresh_window of the old gap too, so there the prefix is exactly the
    rebuilt prompt's, every layer, while the text between the two windows stays stale."""
    lines = TEXT.splitlines(keepends=True)
    c = len("".join(lines[: len(lines) // 4]))
    line = 3 * len(lines) // 4
    doc = FimStream.open(fim_engine, "file:///far.py", TEXT, "pie", gap_at=c)
    try:
        old, w = doc.prompt.gap, fim_engine.config.refresh_window
        doc.complete(line, 0)
        g = doc.prompt.gap
        assert g - old > 2 * w, "the windows must not meet for this test to say anything"
        assert not doc.stale[old: old + w].any() and doc.stale[old + w: g - w].all()
        rebuilt = FimStream.open(fim_engine, "file:///far-rb.py", doc.text, "pie", gap_at=doc.offset(line, 0))
        (k, v), (kr, vr) = stream_kv(doc), stream_kv(rebuilt)
        at = slice(1 + old, 1 + old + w)  # after the prefix marker
        assert torch.allclose(k[:, :, at], kr[:, :, at], atol=1e-5)
        assert torch.allclose(v[:, :, at], vr[:, :, at], atol=1e-5)
        fim_engine.close(rebuilt.uri)
    finally:
        fim_engine.close(doc.uri)


def test_the_start_of_a_suffix_encoded_as_prefix_is_encoded_again(fim_engine):
    """A stream opens with its gap at the end: every token is encoded as prefix. At the first
    cursor, the suffix's first fim_window tokens are encoded again after the marker, so they are
    exactly the rebuilt prompt's, every layer; the rest of the suffix is not. A second completion
    with nothing changed encodes nothing."""
    lines = TEXT.splitlines(keepends=True)
    line, head, w = len(lines) // 4, 40, fim_engine.config.refresh_window
    doc = fim_engine.open("file:///head.py", TEXT)
    try:
        doc.configure(fim_window=head)
        doc.complete(line, 0)
        g = doc.prompt.gap
        assert doc.n - g > head + w, "the suffix must be longer than the window for this test to say anything"
        rebuilt = FimStream.open(fim_engine, "file:///head-rb.py", doc.text, "pie", gap_at=doc.offset(line, 0))
        (k, v), (kr, vr) = stream_kv(doc), stream_kv(rebuilt)
        at, beyond = slice(2 + g, 2 + g + head), slice(2 + g + head, 2 + doc.n - w)  # after both markers
        assert torch.allclose(k[:, :, at], kr[:, :, at], atol=1e-5)
        assert torch.allclose(v[:, :, at], vr[:, :, at], atol=1e-5)
        assert not torch.allclose(v[:, :, beyond], vr[:, :, beyond], atol=1e-3)
        fim_engine.close(rebuilt.uri)
        encoded = doc.stats["tokens_encoded_total"]
        doc.complete(line, 0)
        assert doc.stats["tokens_encoded_total"] == encoded
    finally:
        fim_engine.close(doc.uri)


def test_a_far_move_s_encode_is_cancellable_and_nothing_is_lost(fim_engine):
    """What a cursor move leaves to encode runs in the completion's stepper: cancelled before
    its first pass, the completion answers nothing and the marked tokens stay dirty; the next
    completion encodes them and answers as a stream never cancelled."""
    line = 3 * TEXT.count("\n") // 4
    doc, twin = (fim_engine.open(f"file:///cancel{i}.py", TEXT) for i in range(2))
    try:
        comp = doc.suggest(line, 0, should_stop=lambda: True)
        assert comp.stop == "cancelled" and comp.text == ""
        assert doc.region.dirty_tokens().any() and doc.prompt.marker_dirty
        assert doc.complete(line, 0) == twin.complete(line, 0)
        assert not doc.region.dirty_tokens().any()
        assert torch.equal(stream_kv(doc)[0], stream_kv(twin)[0])
    finally:
        fim_engine.close(doc.uri)
        fim_engine.close(twin.uri)


def test_completion_reads_the_suffix_exactly_as_the_psm_prompt(fim_engine):
    """Unlike masked prefix decoding, a FIM completion depends on the text after the cursor; on a
    freshly built stream its first step is exactly the model's on the PSM prompt."""
    line = TEXT.count("\n") // 2
    head = "".join(TEXT.splitlines(keepends=True)[:line]) + "    value = compute"
    tops = []
    for i, tail in enumerate(["(a, b)\n    return value\n", "_all()\n    raise ValueError('no')\n"]):
        doc = FimStream.open(fim_engine, f"file:///x{i}.py", head + tail, "pie", gap_at=len(head))
        assert doc.state.ends[doc.prompt.gap - 1] == len(head)        # a clean token boundary: nothing forced
        comp = doc.suggest(line, len("    value = compute"), n=3, multiline=False)
        seq, mid = psm_ids(fim_engine, doc, doc.prompt.gap)
        with torch.inference_mode():
            ref = fim_engine.model.hf(torch.tensor([seq + [mid]])).logits[0, -1]
        assert comp.first_tokens == ref.topk(3).indices.tolist()
        tops.append(ref)
    assert (tops[0] - tops[1]).abs().max() > 1e-3               # the suffix changes the answer


def test_a_fork_is_an_independent_stream(fim_engine):
    doc = fim_engine.open("file:///fk.py", TEXT)
    line = TEXT.count("\n") // 2
    want = doc.complete(line, 0)
    twin = doc.fork("file:///fk2.py")
    assert twin.complete(line, 0) == want
    twin.edit((0, 0), (0, 0), "import os\n")
    assert doc.text == TEXT and doc.complete(line, 0) == want
    assert torch.equal(stream_kv(doc)[0], stream_kv(doc.fork("file:///fk3.py"))[0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 22), st.sampled_from(["", "    x = 1\n", "y"]), st.integers(1, 22)),
                min_size=1, max_size=3))
def test_full_on_a_stream_is_the_rebuilt_prompt_at_every_completion(fim_engine, steps):
    """`full` keeps the exact cache on a FIM stream too: after edits and cursor moves (an edit
    re-encodes past the gap, a move shifts tokens across it), a completion sees exactly the PSM
    prompt rebuilt at its cursor."""
    doc = FimStream.open(fim_engine, "file:///full.py", TEXT, "full", gap_at=len(TEXT) // 2)
    try:
        for at, text, cursor in steps:
            doc.edit((at, 0), (at, 0), text)
            line = min(cursor, doc.text.count("\n") - 1)
            got = doc.complete(line, 0)
            fresh = FimStream.open(fim_engine, "file:///rebuilt.py", doc.text, "pie", gap_at=doc.offset(line, 0))
            try:
                assert fresh.prompt.gap == doc.prompt.gap and not doc.stale.any()
                (k, v), (kf, vf) = stream_kv(doc), stream_kv(fresh)
                assert torch.allclose(k, kf, atol=1e-4) and torch.allclose(v, vf, atol=1e-4)
                assert got == fresh.complete(line, 0)
            finally:
                fim_engine.close(fresh.uri)
    finally:
        fim_engine.close(doc.uri)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 23), st.sampled_from(["", "    x = 1\n", "y"])),
                min_size=1, max_size=6))
def test_sided_suffix_tokens_were_encoded_after_the_marker(fim_engine, steps):
    """FimStream.sided never claims a token whose K/V were encoded before the marker, and after
    each completion the suffix's first fim_window tokens hold K/V encoded after it, through edits
    and cursor moves. The side of each write is watched where the region records it."""
    doc = fim_engine.open("file:///sided.py", TEXT, strategy="pie")
    f, region, head = doc.prompt, doc.region, 2 * fim_engine.config.refresh_window  # beyond its window
    seen = {"side": np.zeros(doc.n, dtype=bool)}  # the side of each token's last write
    written, before_splice = region.written, f.before_splice

    def watch_write(idx, stale):
        seen["side"][np.asarray(idx)] = np.asarray(idx) >= f.gap
        written(idx, stale)

    def watch_splice(d, keep):
        side, kept = np.zeros(len(keep), dtype=bool), keep >= 0
        side[kept] = seen["side"][keep[kept]]
        seen["side"] = side
        before_splice(d, keep)

    region.written, f.before_splice = watch_write, watch_splice
    try:
        doc.configure(fim_window=head)
        for is_edit, line, text in steps:
            line = min(line, doc.text.count("\n") - 1)
            if is_edit:
                doc.edit((line, 0), (line, 0), text)
            else:
                doc.complete(line, 0)
                g = f.gap
                assert seen["side"][g: g + head].all()
            assert not (f.sided & ~seen["side"]).any()
    finally:
        fim_engine.close(doc.uri)
