"""Batched decode across documents (batch.py): completions run by one Scheduler, their steps in
one forward, give the same tokens as each decoded alone (greedy, fp32): mixed lengths, strategies,
candidates, FIM and non-FIM documents, and completions joining a running batch between steps.
Cancellation stops a batched completion within one step and leaves the others as they were."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from livekv.incremental import batch
from livekv.incremental.batch import Scheduler
from livekv.incremental.fim import FIM_TOKENS, FimStream

from conftest import CountingForward, excerpt, stdlib_source, tiny_llama, train_tokenizer

SOURCE = stdlib_source()
# (first line, lines, strategy, fim): documents of different lengths and kinds
DOCS = [(40, 12, "pie", False), (300, 40, "lazy", False), (700, 25, "pie-blend", False),
        (900, 8, "pie", True), (1200, 30, "lazy", True)]
EDIT = "    value = compute(a, b)\n"


@pytest.fixture(scope="module")
def eng():
    """A tiny Llama whose tokenizer has FIM tokens; documents are FIM streams only when opened
    as such (fim off by default), so one engine holds both kinds and one batch can mix them."""
    return tiny_llama(train_tokenizer(FIM_TOKENS), seed=3, max_new_tokens=10, fim="off")


def open_docs(eng, tag: str) -> list:
    """The same documents every time: opened, then edited (lazy ones get pending deltas)."""
    docs = []
    for i, (first, n, strategy, fim) in enumerate(DOCS):
        uri, text = f"file:///{tag}/d{i}.py", excerpt(SOURCE, first, n)
        doc = FimStream.open(eng, uri, text, strategy) if fim else eng.open(uri, text, strategy=strategy)
        eng.documents[uri] = doc
        doc.edit((2, 0), (2, 0), EDIT)
        doc.edit((n // 2, 0), (n // 2 + 1, 0), "")
        docs.append(doc)
    return docs


def close_docs(eng, docs) -> None:
    for d in docs:
        eng.close(d.uri)


def cursor(doc, k: int) -> tuple[int, int]:
    """A cursor at the end of some line of doc (k picks which)."""
    lines = doc.text.split("\n")
    line = 3 + k % max(1, len(lines) - 5)
    return line, len(lines[line])


def together(eng, requests, joins, first_passes_first: bool = False) -> list:
    """Each request (doc, line, col, n) as a stepper of one Scheduler, request i joining before
    step joins[i]; returns their Completions."""
    sched, out = Scheduler(eng.model, first_passes_first), {}
    order = sorted(range(len(requests)), key=lambda i: joins[i])
    step = 0
    while order or len(sched):
        while order and joins[order[0]] <= step:
            i = order.pop(0)
            doc, line, col, n = requests[i]

            def done(value, error, i=i):
                assert error is None, error
                out[i] = value
            sched.add(doc.suggesting(line, col, n=n), done)
        sched.step()
        step += 1
    return [out[i] for i in range(len(requests))], sched


REQUESTS = st.lists(st.tuples(st.integers(0, len(DOCS) - 1), st.integers(0, 50), st.integers(1, 3),
                              st.integers(0, 6)), min_size=2, max_size=5, unique_by=lambda r: r[0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(REQUESTS, st.booleans())
def test_batched_decode_gives_the_tokens_of_each_completion_alone(eng, reqs, first_passes_first):
    alone_docs, batch_docs = open_docs(eng, "alone"), open_docs(eng, "batch")
    try:
        expected = []
        for d, k, n, _ in reqs:
            doc = alone_docs[d]
            expected.append(doc.suggest(*cursor(doc, k), n=n))
        got, _ = together(eng, [(batch_docs[d], *cursor(batch_docs[d], k), n) for d, k, n, _ in reqs],
                              [j for *_, j in reqs], first_passes_first)
        for e, g in zip(expected, got):
            assert (g.texts, g.ids, g.first_tokens, g.stop, g.steps) == (e.texts, e.ids, e.first_tokens, e.stop, e.steps)
        for a, b in zip(alone_docs, batch_docs):
            assert a.stats["stale_tokens"] == b.stats["stale_tokens"] and a.text == b.text
    finally:
        close_docs(eng, alone_docs + batch_docs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 6)), min_size=1, max_size=8), st.booleans())
def test_first_passes_first_runs_a_new_stepper_next_and_delays_the_others_one_step_at_most(arrivals, first):
    """Steppers (joining before step j, wanting k passes) record the step that ran each pass:
    a new one's first pass runs in the very next step; the others' passes are one step apart,
    or two when first passes went ahead (first_passes_first), never more."""
    sched, ran = Scheduler(None, first_passes_first=first), {}

    def stepper(i: int, k: int):
        for _ in range(k):
            yield None  # a pass-free step: the model is not called
            ran.setdefault(i, []).append(sched.steps)
    order, step = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0]), 0
    joined = {}
    while order or len(sched):
        while order and arrivals[order[0]][0] <= step:
            i = order.pop(0)
            joined[i] = sched.steps
            sched.add(stepper(i, arrivals[i][1]), lambda v, e: None)
        sched.step()
        step += 1
    for i, (_, k) in enumerate(arrivals):
        assert len(ran[i]) == k and ran[i][0] == joined[i]
        gaps = {b - a for a, b in zip(ran[i], ran[i][1:])}
        assert gaps <= ({1, 2} if first else {1})
    assert (sched.ahead_steps > 0) == (first and any(len(ran[i]) > 1 and max(
        b - a for a, b in zip(ran[i], ran[i][1:])) == 2 for i in ran))


def test_one_step_runs_every_pending_pass_in_one_forward(eng):
    docs = open_docs(eng, "forward")
    try:
        sched = Scheduler(eng.model)
        for d in docs:  # a FIM stream's cursor and pie-blend's repair encode before the first pass
            sched.add(d.suggesting(*cursor(d, 1)), lambda v, e: None)
        with CountingForward(eng.model) as fwd:
            while len(sched):
                sched.step()
    finally:
        close_docs(eng, docs)
    forwards = [len(f) for f in fwd.forwards]
    assert forwards[0] == len(docs)  # every document's first pass (its tail) in one forward
    assert sum(f >= 2 for f in forwards) >= 3  # and decode steps shared forwards after it
    assert len(forwards) == sched.steps and sum(forwards) == sched.passes


def test_cancelling_a_batched_completion_stops_it_within_one_step(eng):
    docs, ref_docs = open_docs(eng, "cancel"), open_docs(eng, "cancel-ref")
    try:
        expected = [d.suggest(*cursor(d, 7), max_new_tokens=10) for d in ref_docs]
        assert expected[0].steps == 10  # the one to cancel would run on
        flag = {"stop": False}
        sched, out = Scheduler(eng.model), {}
        for i, d in enumerate(docs):
            stop = (lambda: flag["stop"]) if i == 0 else None
            sched.add(d.suggesting(*cursor(d, 7), max_new_tokens=10, should_stop=stop),
                      lambda v, e, i=i: out.__setitem__(i, v))
        sched.step()  # the tails
        sched.step()  # one decode step
        flag["stop"] = True
        running = len(sched)
        sched.step()
        # it takes the token of the pass already in flight when stopped, and no more
        assert 0 in out and out[0].stop == "cancelled" and out[0].steps == 3
        assert len(sched) < running
        while len(sched):
            sched.step()
    finally:
        close_docs(eng, docs + ref_docs)
    for i in range(1, len(docs)):
        assert (out[i].texts, out[i].ids) == (expected[i].texts, expected[i].ids)
    assert expected[0].text.startswith(out[0].text)


def test_a_stepper_that_fails_is_reported_and_the_others_go_on(eng):
    docs = open_docs(eng, "fail")
    try:
        sched, out = Scheduler(eng.model), {}

        def broken():
            yield from ()
            raise ValueError("no such line")
        sched.add(broken(), lambda v, e: out.__setitem__("broken", e))
        sched.add(docs[0].suggesting(*cursor(docs[0], 0)), lambda v, e: out.__setitem__("ok", v))
        while len(sched):
            sched.step()
    finally:
        close_docs(eng, docs)
    assert isinstance(out["broken"], ValueError) and out["ok"].steps >= 1


def test_alone_is_a_batch_of_one(eng):
    docs = open_docs(eng, "one")
    try:
        d = docs[1]
        line, col = cursor(d, 4)
        comp = batch.alone(eng.model, d.suggesting(line, col))
        assert comp.text == d.suggest(line, col).text
    finally:
        close_docs(eng, docs)
