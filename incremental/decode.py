"""Greedy next-line decoding at a cursor, attending only to the cached tokens before it.

The cached suffix after the cursor is masked, not dropped: it stays cached for later edits. The
completion's own tokens live in scratch slots past the document's end, at the positions they
would have right after the cursor, so the document's cache is never touched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch


@dataclass
class Completion:
    """What one completion did; Document.stats['last_completion'] reports its summary."""
    prefix_tokens: int = 0
    tail_tokens: int = 0
    steps: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    stop: str = ""
    text: str = ""
    ids: list = field(default_factory=list)

    def summary(self) -> dict:
        return dict(prefix_tokens=self.prefix_tokens, tail_tokens=self.tail_tokens, steps=self.steps,
                    ttft_ms=self.ttft_ms, total_ms=self.total_ms, stop=self.stop, text=self.text)


def cursor_context(doc, c: int) -> tuple[int, np.ndarray]:
    """(j, tail): cached tokens [0, j) are the context; `tail` are fresh ids for text[end_j:c].

    The last whole tokens before the cursor (config.fresh_tail, at least one) are always in the
    tail, so the logits at the cursor are computed fresh even when those tokens' cached K/V are
    stale or were just spliced in. A token
    the cursor cuts through is re-tokenized up to the cursor.
    """
    st, mirror = doc.state, doc.engine.mirror
    T = len(st.ids)
    j = int(np.searchsorted(st.ends, c, side="right"))
    j = max(0, j - doc.engine.config.fresh_tail)
    # never cut between the byte tokens of one character: they share one char span
    while 0 < j < T and st.ends[j - 1] > st.starts[j]:
        j -= 1
    e = int(st.ends[j - 1]) if j > 0 else 0
    # Tokenize from a couple of tokens earlier, so a tokenizer that marks the start of its input
    # (SentencePiece) marks that earlier spot, then keep the tokens from e on.
    x = int(st.starts[max(0, j - 2)]) if j > 0 else 0
    ids, starts, ends = mirror.tokenize(st.text[x:c])
    starts = starts + x
    k = int(np.searchsorted(starts, e, side="left"))
    if x < e and k < len(ids) and starts[k] == e and (k == 0 or ends[k - 1] + x <= e):
        tail = ids[k:]
    else:
        tail = mirror.tokenize(st.text[e:c])[0]
    return j, tail


def _start_token(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if t is not None:
            return int(t)
    return 0


def decode_line(doc, c: int, max_new: int, comp: Completion,
                should_stop: Callable[[], bool] | None) -> Iterator[str]:
    t0 = time.perf_counter()
    eng = doc.engine
    model, kv, tok = eng.model, doc.kv, eng.tokenizer
    j, tail = cursor_context(doc, c)
    if len(tail) == 0:  # cursor at the very start: there is no context at all
        tail = np.array([_start_token(tok)], dtype=np.int64)
    doc.settle(upto=j)  # dirty tokens after the cursor are not needed now
    T, n_tail = kv.length, len(tail)
    kv.reserve(T + n_tail + max_new + 1)
    comp.prefix_tokens, comp.tail_tokens = j, n_tail
    visible = torch.zeros(T + n_tail + max_new + 1, dtype=torch.bool)
    visible[:j] = True                                                    # the cached prefix only
    mask = visible[: T + n_tail].repeat(n_tail, 1)                         # (n_tail, T + n_tail)
    mask[:, T:] = torch.ones(n_tail, n_tail, dtype=torch.bool).tril()
    logits = model.forward(kv, torch.from_numpy(tail), torch.arange(j, j + n_tail), T, T + n_tail, mask,
                           logits_at=torch.tensor([n_tail - 1]))
    context = tail.tolist()
    base = tok.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    gen, emitted = [], ""
    try:
        for step in range(max_new):
            t = int(logits[-1].argmax())
            if step == 0:
                comp.ttft_ms = (time.perf_counter() - t0) * 1e3
            comp.steps = step + 1
            if t in eng.stop_ids:
                comp.stop = "eos"
                break
            gen.append(t)
            comp.ids = list(gen)
            # decode with the context so tokenizers that drop a leading space decode it right
            text = tok.decode(context + gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)[len(base):]
            cut = min((i for i in (text.find("\n"), text.find("\r")) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
            elif text.endswith("\ufffd"):
                text = emitted  # a character split across tokens: wait for its other bytes
            if len(text) > len(emitted) and text.startswith(emitted):
                piece, emitted = text[len(emitted):], text
                comp.text = emitted
                yield piece
            if cut >= 0:
                comp.stop = "newline"
                break
            if step == max_new - 1:
                comp.stop = "max_new_tokens"
                break
            if should_stop is not None and should_stop():
                comp.stop = "cancelled"
                break
            slot = T + n_tail + step
            visible[T: slot + 1] = True
            logits = model.forward(kv, torch.tensor([t]), torch.tensor([j + n_tail + step]), slot, slot + 1,
                                   visible[: slot + 1][None], logits_at=torch.tensor([0]))
    except GeneratorExit:
        comp.stop = comp.stop or "closed"
        raise
    finally:
        comp.total_ms = (time.perf_counter() - t0) * 1e3
