"""Greedy decoding at a cursor, attending only to the cached tokens before it.

The cached suffix after the cursor is masked, not dropped: it stays cached for later edits. The
completion's own tokens live in scratch slots past the document's end, at the positions they
would have right after the cursor, so the document's cache is never touched.

k candidates decode together: they share the cached prefix and the fresh tail (attended once
per step, in one forward pass), start from the k best first tokens, and each sees only its own
generated tokens, through the attention mask. One pass per step reads the weights once for all k.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np
import torch

from .stops import Brackets, Stop, indent_width
from .update import keys_end, visible_slots

_BLOCK_HEADER = re.compile(r"^\s*(async\s+)?(def|class|if|elif|else|for|while|with|try|except|finally|match|case)\b.*:\s*$")


@dataclass
class Completion:
    """What one completion request produced; Document.stats['last_completion'] summarises it."""
    texts: list = field(default_factory=list)
    prefix_tokens: int = 0
    tail_tokens: int = 0
    steps: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    stop: str = ""
    mode: str = "line"
    incomplete: bool = False      # maxPromptMs fired: the cache was not up to date in time
    capped: bool = False          # maxPredictMs fired: the text is cut at a token boundary
    reused: bool = False          # answered from the suggestion being typed, no model call
    first_tokens: list = field(default_factory=list)  # each candidate's first token id

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def summary(self) -> dict:
        return dict(prefix_tokens=self.prefix_tokens, tail_tokens=self.tail_tokens, steps=self.steps,
                    ttft_ms=self.ttft_ms, total_ms=self.total_ms, stop=self.stop, text=self.text,
                    candidates=len(self.texts), mode=self.mode, incomplete=self.incomplete, capped=self.capped,
                    reused=self.reused)


def cursor_context(doc, c: int, extra: str = "", fresh: int | None = None) -> tuple[int, np.ndarray]:
    """(j, tail): cached tokens [0, j) are the context; `tail` are fresh ids for the text from
    the end of token j-1 to the cursor, followed by `extra` (text assumed typed at the cursor).

    The last whole tokens before the cursor (config.fresh_tail, at least one) are always in the
    tail, so the logits at the cursor are computed fresh even when those tokens' cached K/V are
    stale or were just spliced in. A token the cursor cuts through is re-tokenized up to it.
    """
    st, mirror = doc.state, doc.engine.mirror
    T = len(st.ids)
    j = int(np.searchsorted(st.ends, c, side="right"))
    j = max(0, j - (doc.engine.config.fresh_tail if fresh is None else fresh))
    while 0 < j < T and st.ends[j - 1] > st.starts[j]:  # never split one character's byte tokens
        j -= 1
    e = int(st.ends[j - 1]) if j > 0 else 0
    # Tokenize from a couple of tokens earlier, so a tokenizer that marks the start of its input
    # (SentencePiece) marks that earlier spot, then keep the tokens from e on.
    x = int(st.starts[max(0, j - 2)]) if j > 0 else 0
    ids, starts, ends = mirror.tokenize(st.text[x:c] + extra)
    starts = starts + x
    k = int(np.searchsorted(starts, e, side="left"))
    if x < e and k < len(ids) and starts[k] == e and (k == 0 or ends[k - 1] + x <= e):
        return j, ids[k:]
    return j, mirror.tokenize(st.text[e:c] + extra)[0]


def _prefix_context(doc, c: int, extra: str) -> tuple[int, np.ndarray, str]:
    """(j, tail, heal) for masked prefix decoding; with token healing the tail's last token is
    taken back and `heal` is its text, which the first generated token must re-type."""
    cfg = doc.engine.config
    j, tail = cursor_context(doc, c, extra)
    heal = ""
    if cfg.token_healing:
        if len(tail) < 2:  # healing takes the last tail token back: keep one to run
            j, tail = cursor_context(doc, c, extra, fresh=cfg.fresh_tail + 1)
        heal = doc.engine.token_text(int(tail[-1])) if len(tail) >= 2 else ""
        if heal and "\ufffd" not in heal:
            tail = tail[:-1]
        else:
            heal = ""
    if len(tail) == 0:  # cursor at the very start: there is no context at all
        tail = np.array([_start_token(doc.engine.tokenizer)], dtype=np.int64)
    return j, tail, heal


def make_stop(doc, c: int, extra: str, multiline: bool, max_lines: int | None = None) -> Stop:
    """The stop policy at the cursor: a block suggestion after a block-opening colon with nothing
    after the cursor, else the rest of the line (the next line when this one is finished)."""
    cfg, text = doc.engine.config, doc.state.text
    line, col = doc.engine.mirror.position(doc.state, c)
    line_start = c - col
    nxt = doc.state.lines[line + 1] if line + 1 < len(doc.state.lines) else len(text)
    rest = text[c:nxt].rstrip("\r\n")
    virtual = re.split(r"\r\n|\r|\n", text[line_start:c] + extra)[-1]  # the cursor's line so far
    at_eol = rest.strip() == ""
    opens = False
    if multiline and at_eol and virtual.rstrip().endswith(":"):
        tree = doc.syntax_tree() if not extra else None
        opens = tree.opens_block(c) if tree is not None else bool(_BLOCK_HEADER.match(virtual))
    brackets = Brackets()
    brackets.feed(text[doc.statement_start(c): c] + extra)
    # Brackets the rest of the line closes (an editor's auto-closed ")") are not the suggestion's
    # to close: with any of them, it may close none of the context's.
    after = Brackets(list(brackets.stack), brackets.quote)
    if after.feed(rest) is not None or len(after.stack) < len(brackets.stack):
        brackets = Brackets(quote=brackets.quote)
    return Stop(mode="block" if opens else "line", header_indent=indent_width(virtual),
                max_lines=max_lines or cfg.max_lines, leading_newline=at_eol and virtual.strip() != "" and not opens,
                context=brackets)


def _start_token(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if t is not None:
            return int(t)
    return 0


def decode(doc, c: int, n: int, max_new: int, should_stop: Callable[[], bool] | None = None, extra: str = "",
           max_prompt_ms: float = 0, max_predict_ms: float = 0, multiline: bool = True,
           max_lines: int | None = None) -> Generator[str, None, Completion]:
    """Yield candidate 0's text piece by piece as it becomes final; return the Completion."""
    t0 = time.perf_counter()
    eng = doc.engine
    model, kv, tok = eng.model, doc.kv, eng.tokenizer
    stop_at = make_stop(doc, c, extra, multiline, max_lines)
    comp = Completion(mode=stop_at.mode)
    fim = doc.fim
    soft = ""
    if fim is None:
        j, tail, heal = _prefix_context(doc, c, extra)
    else:  # the whole PSM stream is attended; the tail is <|fim_middle|> and the text to the cursor
        tail, heal = fim.prepare(c, extra, eng.config.token_healing)
        soft = fim.soft
        j = doc.gap
    comp.prefix_tokens, comp.tail_tokens = j, len(tail)
    # bring the cache up to date before the cursor (after it, nothing is attended now)
    p0 = doc.pos0
    before = doc.span(j)                        # the slots of the tokens before the cursor
    dirty = int(kv.dirty[before].sum())
    if dirty:
        cancelled = lambda: should_stop is not None and should_stop()  # noqa: E731
        late = lambda: bool(max_prompt_ms) and (time.perf_counter() - t0) * 1e3 > max_prompt_ms  # noqa: E731
        if max_prompt_ms and dirty * doc.encode_ms_per_token > max_prompt_ms:
            comp.incomplete, comp.stop = True, "prompt_cap"   # would not fit: do not even start
        elif not doc.settle(upto=j, should_stop=lambda: cancelled() or late()):
            comp.incomplete, comp.stop = (False, "cancelled") if cancelled() else (True, "prompt_cap")
    if comp.stop:
        comp.texts = [""]
        comp.total_ms = (time.perf_counter() - t0) * 1e3
        return comp
    n_tail = len(tail)
    need = n_tail + max_new * n + 1
    S = doc.scratch(need)                       # the target group's slots
    others = keys_end(doc, after_gap=fim is not None)
    width = max(S + need, others)
    visible = visible_slots(doc, width)         # the groups before this document ...
    if fim is None:
        visible[before] = True                  # ... and its own tokens before the cursor
        # φ, the target group's first position: right after the cursor, or after the document
        phi = p0 + (j if eng.config.phi == "cursor" else doc.n)
    else:
        fim.visible(visible)
        phi = fim.end_position()
    visible[S: S + n_tail] = True
    n_keys = max(S + n_tail, others)
    mask = visible[:n_keys].repeat(n_tail, 1)                                 # (n_tail, n_keys)
    mask[:, S: S + n_tail] = torch.ones(n_tail, n_tail, dtype=torch.bool).tril()
    logits = model.forward(kv, torch.from_numpy(tail), torch.arange(phi, phi + n_tail), S, n_keys, mask,
                           logits_at=torch.tensor([n_tail - 1]))             # (1, V)
    comp.ttft_ms = (time.perf_counter() - t0) * 1e3
    t_decode = time.perf_counter()
    context = tail.tolist()
    base = tok.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if heal:
        # Token healing: the last token before the cursor was taken back, and the first new token
        # must re-type its text. A cursor that cuts a token ("ret|urn", "\n|    x") then gets the
        # tokens the model knows ("return", "\n    ") instead of a fragment it never saw.
        logits = logits.masked_fill(~eng.healing_mask(heal)[None], float("-inf"))
    nexts = torch.topk(logits[0], n).indices.tolist()                        # k distinct first tokens
    comp.first_tokens = list(nexts)
    ids = [[] for _ in range(n)]
    texts = [""] * n
    active = list(range(n))
    emitted = ""
    step = 0
    while True:
        still = []
        for row, cand in enumerate(active):
            t = int(nexts[row])
            if t in eng.stop_ids:
                comp.stop = comp.stop or "eos"
                continue
            ids[cand].append(t)
            raw = tok.decode(context + ids[cand], skip_special_tokens=False, clean_up_tokenization_spaces=False)[len(base):]
            if heal:
                assert raw.startswith(heal), "a healed token must re-type the text it replaced"
                raw = raw[len(heal):]
            if soft:  # FIM: indentation the model writes again, which the line already has
                raw = "" if soft.startswith(raw) else raw[len(soft):] if raw.startswith(soft) else raw
            if raw.endswith("\ufffd"):
                raw = raw.rstrip("\ufffd")  # a character split across tokens: wait for its other bytes
            texts[cand], done = stop_at.cut(raw)
            if cand == 0 and len(texts[0]) > len(emitted):
                piece, emitted = texts[0][len(emitted):], texts[0]
                yield piece
            if done:
                comp.stop = comp.stop or ("block_end" if stop_at.mode == "block" else "newline")
            else:
                still.append(cand)
        active = still
        comp.steps = step + 1
        if not active:
            break
        if step + 1 >= max_new:
            comp.stop = "max_new_tokens"
            break
        if should_stop is not None and should_stop():
            comp.stop = "cancelled"
            break
        # the cap applies once there is text to show: a first step that only re-typed the healed
        # token would otherwise be cut to nothing
        if max_predict_ms and texts[0] and (time.perf_counter() - t_decode) * 1e3 > max_predict_ms:
            comp.stop, comp.capped = "predict_cap", True
            break
        # one forward for every active candidate: each sees the context, the tail and its own tokens
        first = S + n_tail + step * n
        n_keys = max(first + n, others)
        m = visible[:n_keys].repeat(len(active), 1)                           # (a, n_keys)
        own = S + n_tail + torch.arange(step + 1)[None, :] * n + torch.tensor(active)[:, None]
        m.scatter_(1, own, True)
        slots = torch.tensor([first + cand for cand in active])
        q_ids = torch.tensor([ids[cand][-1] for cand in active])
        pos = torch.full((len(active),), phi + n_tail + step)
        logits = model.forward(kv, q_ids, pos, int(slots[0]) if len(active) == 1 else slots, n_keys, m,
                               logits_at=torch.arange(len(active)))
        nexts = logits.argmax(-1).tolist()
        step += 1
    comp.texts = list(dict.fromkeys(texts))  # distinct, best first
    if emitted != comp.texts[0]:
        assert comp.texts[0].startswith(emitted), "streamed text was taken back"
        yield comp.texts[0][len(emitted):]
    comp.total_ms = (time.perf_counter() - t0) * 1e3
    return comp
