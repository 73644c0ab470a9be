"""The decode loop: greedy decoding from a Cursor, k candidates in one batched pass per step,
as a stepper (batch.py): a scheduler can run the steps of many completions in one forward.

The prompt layout (doc.prompt) gives the cursor's context and tail; layout.Completion says what
each query sees. The completion's own tokens live in scratch slots past the document's end, so
the document's cache is never touched.

k candidates decode together: they share the cached context and the fresh tail (attended once
per step, in one forward pass), start from the k best first tokens, and each sees only its own
generated tokens, through the attention mask. One pass per step reads the weights once for all k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Generator

import numpy as np
import torch

from . import batch, encode, layout
from .batch import Pass, Stepper
from .group import in_use
from .quant import native_fp16
from .stops import stop_policy

# decode steps read an fp16 copy of the cache only where the model's K/V stayed this far inside
# fp16's range (65,504) on the load's probe tokens: longer texts may reach further
FP16_KV_PEAK = 4096.0


def reads_fp16(config, model) -> bool:
    """Whether a decode step under config reads the cache's fp16 copy (Pass.kv16): on a CPU only
    (the copy feeds torch's fused CPU attention), never at fp32, nor for a model whose K/V leave
    fp16's safe range; with decode_kv auto only where the CPU computes in fp16 natively, since
    elsewhere that kernel runs fp16 slower than fp32 (README, "Decode steps read an fp16 copy")."""
    if model.device.type != "cpu" or config.decode_kv == "fp32" or model.kv_peak > FP16_KV_PEAK:
        return False
    if model.precision.resolve(config.precision) == "fp32":
        return False
    return config.decode_kv == "fp16" or native_fp16(model.device)


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
    drafted: bool = False         # the healing draft held: the second token came with the first
    first_tokens: list = field(default_factory=list)  # each candidate's first token id
    ids: list = field(default_factory=list)           # candidate 0's decoded token ids

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    def summary(self) -> dict:
        return dict(prefix_tokens=self.prefix_tokens, tail_tokens=self.tail_tokens, steps=self.steps,
                    ttft_ms=self.ttft_ms, total_ms=self.total_ms, stop=self.stop, text=self.text,
                    candidates=len(self.texts), mode=self.mode, incomplete=self.incomplete, capped=self.capped,
                    reused=self.reused, drafted=self.drafted)


def _up_to_date(doc, j: int, comp: Completion, t0: float, should_stop, max_prompt_ms: float,
                rider: encode.Rider | None = None) -> Stepper:
    """Encode what the completion reads and is dirty (the prompt layout says which), within
    max_prompt_ms; the rider (the completion's tail) joins the last pass. False, with comp.stop
    saying why, when that did not happen."""
    dirty = doc.prompt.to_encode(doc, j)
    if not dirty:
        return True
    yield from ()  # a stepper even when there is nothing to encode
    cancelled = lambda: should_stop is not None and should_stop()  # noqa: E731
    late = lambda: bool(max_prompt_ms) and (time.perf_counter() - t0) * 1e3 > max_prompt_ms  # noqa: E731
    if max_prompt_ms and dirty * doc.encode_ms_per_token > max_prompt_ms:
        comp.incomplete, comp.stop = True, "prompt_cap"   # would not fit: do not even start
    elif not (yield from doc.prompt.settling(doc, j, lambda: cancelled() or late(), rider)):
        comp.incomplete, comp.stop = (False, "cancelled") if cancelled() else (True, "prompt_cap")
    return not comp.stop


def teacher_forced(doc, c: int, forced: list[int]) -> torch.Tensor:
    """(len(forced) + 1, V) log-probabilities at char offset c: of the first token, then of the
    token after each forced one, as decoding there would have them (one forward pass; the first
    row healed like a decode's). For measuring a cache against another, teacher-forced on the
    same tokens."""
    eng = doc.engine
    cur = doc.prompt.cursor(doc, c, "", eng.config.token_healing)
    doc.before_completion(cur.j)
    if not batch.alone(eng.model, _up_to_date(doc, cur.j, Completion(), time.perf_counter(), None, 0)):
        raise RuntimeError("the cache could not be brought up to date")
    n_tail = len(cur.tail)
    seq = np.concatenate([cur.tail, np.asarray(forced, dtype=np.int64)])
    run = replace(cur, tail=seq)
    lay = layout.Completion(doc, run, len(seq) + 1)
    logits = eng.model.forward(doc.kv, torch.from_numpy(seq), torch.arange(cur.phi, cur.phi + len(seq)), lay.S,
                               lay.tail(), logits_at=torch.arange(n_tail - 1, len(seq)), precision=doc.config.precision,
                               shared=layout.apart(doc))
    if cur.heal:
        first = logits[:1].masked_fill(~eng.healing_mask(cur.heal)[None], float("-inf"))
        logits = torch.cat([first, logits[1:]])
    return torch.log_softmax(logits, dim=-1)


def _new_text(tok, context: list[int], ids: list[int], base: str, cur) -> str:
    """The text a candidate's tokens add after the tail, as far as it is certain."""
    raw = tok.decode(context + ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)[len(base):]
    if cur.heal:
        assert raw.startswith(cur.heal), "a healed token must re-type the text it replaced"
        raw = raw[len(cur.heal):]
    soft = cur.soft
    if soft:  # FIM: indentation the model writes again, which the line already has
        raw = "" if soft.startswith(raw) else raw[len(soft):] if raw.startswith(soft) else raw
    return raw.rstrip("\ufffd")  # a character split across tokens: wait for its other bytes


def decode(doc, c: int, n: int, max_new: int, should_stop: Callable[[], bool] | None = None, extra: str = "",
           max_prompt_ms: float = 0, max_predict_ms: float = 0, multiline: bool = True,
           max_lines: int | None = None) -> Generator[str, None, Completion]:
    """Yield candidate 0's text piece by piece as it becomes final; return the Completion. The
    decoding stepper run alone (a batch of one)."""
    pieces: list[str] = []
    steps = decoding(doc, c, n, max_new, should_stop, extra, max_prompt_ms, max_predict_ms, multiline, max_lines,
                     on_piece=pieces.append)
    return (yield from batch.streaming(doc.engine.model, steps, pieces))


def decoding(doc, c: int, n: int, max_new: int, should_stop: Callable[[], bool] | None = None, extra: str = "",
             max_prompt_ms: float = 0, max_predict_ms: float = 0, multiline: bool = True,
             max_lines: int | None = None, on_piece: Callable[[str], None] | None = None) -> Stepper:
    """A stepper (batch.py) that decodes the completion at char offset c: it yields each forward
    pass (the prompt's encode chunks, the tail, one decode step of all active candidates) and
    is sent back its result. on_piece(text) gets candidate 0's text piece by piece as it becomes
    final. Returns the Completion. should_stop() is checked before every step."""
    shared = layout.apart(doc)  # context groups in another cache, kept from the budget meanwhile
    with in_use(doc, *shared):
        return (yield from _decoding(doc, c, n, max_new, should_stop, extra, max_prompt_ms, max_predict_ms, multiline,
                                     max_lines, on_piece, shared))


def _decoding(doc, c, n, max_new, should_stop, extra, max_prompt_ms, max_predict_ms, multiline, max_lines, on_piece,
              shared) -> Stepper:
    t0 = time.perf_counter()
    eng = doc.engine
    kv, tok = doc.kv, eng.tokenizer
    stop_at = stop_policy(doc, c, extra, multiline, max_lines)
    comp = Completion(mode=stop_at.mode)
    cur = doc.prompt.cursor(doc, c, extra, eng.config.token_healing)
    tail, heal, phi = cur.tail, cur.heal, cur.phi
    comp.prefix_tokens, comp.tail_tokens = cur.j, len(tail)
    doc.before_completion(cur.j)
    n_tail, need = len(tail), len(tail) + max_new * n + 1
    # One candidate is chosen as a decode step chooses (Precision.argmax: on a CPU the int4 head
    # ranks, the best are scored again), with healing's mask; k candidates need the logits.
    greedy = n == 1
    # The healing draft: the token healing took back runs after the tail, in the slot and at the
    # position of the first decoded token. When the model types it again (at a line's end it
    # usually does, and that shows nothing yet), that row gives the second token, and the
    # first visible text comes one pass sooner. Not for whitespace, which the model mostly
    # extends (a newline into the next line's indentation): there the row would cost for nothing.
    draft = int(greedy and max_new > 1 and bool(heal.strip()) and eng.config.heal_draft)
    assert not draft or cur.healed >= 0, "healing took text back without its token"
    run = np.append(tail, cur.healed) if draft else tail                     # (n_tail + draft,)
    mask = eng.healing_mask(heal)[None] if heal else None                   # (1, V)
    allow = None
    if greedy and mask is not None:
        allow = torch.cat([mask, torch.ones_like(mask)]) if draft else mask  # (1 + draft, V)
    # the tail rides with the encode of what an edit left dirty (one pass, not two); not under a
    # lazy layout, which a big encode compacts first
    lay = layout.Completion(doc, cur, need) if doc.region.order is None else None
    rider = None if lay is None else encode.Rider(run, np.arange(phi, phi + len(run)), lay.S, lay.tail(draft),
                                                  rows=1 + draft, argmax=greedy, allow=allow)
    if not (yield from _up_to_date(doc, cur.j, comp, t0, should_stop, max_prompt_ms, rider)):
        comp.texts = [""]
        comp.total_ms = (time.perf_counter() - t0) * 1e3
        return comp
    precision = doc.config.precision
    kv16 = reads_fp16(doc.config, eng.model)
    if rider is not None and rider.out is not None:
        first = rider.out                                  # (1 + draft,) tokens or (1, V) logits
    elif should_stop is not None and should_stop():  # between the prompt's encode and the tail's pass
        comp.texts, comp.stop = [""], "cancelled"
        comp.total_ms = (time.perf_counter() - t0) * 1e3
        return comp
    else:
        lay = lay or layout.Completion(doc, cur, need)
        first = yield Pass(kv, torch.from_numpy(run), torch.arange(phi, phi + len(run)), lay.S, lay.tail(draft),
                           logits_at=torch.arange(n_tail - 1, len(run)), argmax=greedy, precision=precision,
                           shared=shared, allow=allow)
    comp.ttft_ms = (time.perf_counter() - t0) * 1e3
    t_decode = time.perf_counter()
    context = tail.tolist()
    base = tok.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if greedy:
        nexts = first[:1].tolist()
    else:
        if mask is not None:  # the first new token must re-type the text taken back (prompt.heal_last)
            first = first.masked_fill(~mask, float("-inf"))
        nexts = torch.topk(first[0], n).indices.tolist()                     # k distinct first tokens
    comp.first_tokens = list(nexts)
    ahead = int(first[1]) if draft and nexts[0] == cur.healed else None      # step 0's token, drafted
    comp.drafted = ahead is not None
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
            texts[cand], done = stop_at.cut(_new_text(tok, context, ids[cand], base, cur))
            if cand == 0 and len(texts[0]) > len(emitted):
                piece, emitted = texts[0][len(emitted):], texts[0]
                if on_piece is not None:
                    on_piece(piece)
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
        if ahead is not None:  # step 0 ran as the draft, in the prompt's pass
            nexts, ahead = [ahead], None
            step += 1
            continue
        # one forward for every active candidate: each sees the context, the tail and its own tokens
        first = lay.first_slot(step, n)
        slots = torch.tensor([first + cand for cand in active])
        q_ids = torch.tensor([ids[cand][-1] for cand in active])
        pos = torch.full((len(active),), phi + n_tail + step)
        nexts = (yield Pass(kv, q_ids, pos, int(slots[0]) if len(active) == 1 else slots, lay.step(step, active, n),
                            logits_at=torch.arange(len(active)), argmax=True, precision=precision,
                            shared=shared, kv16=kv16)).tolist()
        step += 1
    comp.texts, comp.ids = list(dict.fromkeys(texts)), ids[0]  # distinct, best first
    if emitted != comp.texts[0]:
        assert comp.texts[0].startswith(emitted), "streamed text was taken back"
        if on_piece is not None:
            on_piece(comp.texts[0][len(emitted):])
    comp.total_ms = (time.perf_counter() - t0) * 1e3
    return comp
