"""The prompt a completion decodes from: the cursor's context, token healing, and how a document
is laid out as a prompt.

A document's prompt layout is an object with one interface, held as `doc.prompt`:
- PrefixPrompt (here), for models without FIM tokens: the completion sees the cached tokens
  before the cursor; the suffix after it stays cached, masked.
- FimStream (fim.py), for models with FIM tokens: the document is one PSM stream, and the
  completion sees all of it.
The interface: position_of (where each token is encoded), lazy (whether a lazy layout may hold
it), before_splice (follow an edit), also_sees (what encoding queries see besides the groups),
decode_groups, cursor (the Cursor a completion starts from), to_encode and settling (what it waits
to have encoded, and that encode as a stepper), visible (the columns it reads) and fork.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Cursor:
    """What one completion decodes from."""
    j: int                 # cached tokens [0, j) come before the cursor (prefix_tokens)
    tail: np.ndarray       # fresh ids, run first: the text from token j to the cursor (and `extra`)
    heal: str              # text the first generated token must re-type (token healing)
    phi: int               # the position of tail[0]: where the target group starts
    soft: str = ""         # FIM: indentation the model writes again, taken off the answer
    cut: bool = False      # FIM: the token after the gap holds text from before the cursor
    healed: int = -1       # the token healing took back (-1: none)


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


def heal_last(engine, ids: np.ndarray, keep: int = 0) -> tuple[np.ndarray, str, int]:
    """Token healing: take the last token back (keeping at least `keep`) and return its text,
    which the first generated token must re-type, and its id (-1 when none was taken). A cursor
    that cuts a token ("ret|urn", "\\n|    x") then gets the tokens the model knows ("return",
    "\\n    ") instead of a fragment it never saw. Nothing is taken back from a byte fragment of
    a character."""
    if len(ids) <= keep:
        return ids, "", -1
    heal = engine.token_text(int(ids[-1]))
    if not heal or "\ufffd" in heal:
        return ids, "", -1
    return ids[:-1], heal, int(ids[-1])


def start_token(tok) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if t is not None:
            return int(t)
    return 0


class PrefixPrompt:
    """Masked prefix decoding. Stateless: one per document only to share FimStream's interface."""
    lazy = True

    def position_of(self, doc, idx: np.ndarray) -> np.ndarray:
        return doc.pos0 + idx

    def before_splice(self, doc, keep: np.ndarray) -> None:
        pass

    def settle(self, doc, should_stop=None) -> bool:
        """Encode the document's dirty tokens (FimStream's orders them around its marker)."""
        return doc.settle(should_stop)

    def also_sees(self, doc, idx: np.ndarray) -> list:
        return []

    def to_encode(self, doc, j: int) -> int:
        """Tokens a completion at token j waits for: the dirty ones before it (after it, nothing
        is attended now)."""
        return int(doc.region.dirty_tokens()[:j].sum())

    def settling(self, doc, j: int, should_stop=None, rider=None):
        """The completion's encode, as a stepper (batch.py); the rider joins its last pass."""
        return (yield from doc.settling(should_stop, upto=j, rider=rider))

    def decode_groups(self) -> list:
        return []

    def cursor(self, doc, c: int, extra: str, heal: bool) -> Cursor:
        """The cached tokens before the cursor and a fresh tail; with healing the tail's last
        token is taken back (a tail of one gets one more token first, to keep one to run)."""
        cfg = doc.engine.config
        j, tail = cursor_context(doc, c, extra)
        text, healed = "", -1
        if heal:
            if len(tail) < 2:
                j, tail = cursor_context(doc, c, extra, fresh=cfg.fresh_tail + 1)
            tail, text, healed = heal_last(doc.engine, tail, keep=1)
        if len(tail) == 0:  # cursor at the very start: there is no context at all
            tail = np.array([start_token(doc.engine.tokenizer)], dtype=np.int64)
        # phi, the target group's first position: right after the cursor, or after the document
        phi = doc.pos0 + (j if cfg.phi == "cursor" else doc.n)
        return Cursor(j, tail, text, phi, healed=healed)

    def visible(self, doc, vis, cursor: Cursor) -> None:
        vis[doc.region.span(cursor.j)] = True

    def fork(self, doc, uri: str, strategy: str):
        return doc.copy(uri, strategy)
