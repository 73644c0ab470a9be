"""Context groups shared by every connection of a server, and one memory budget over its caches.

A context file is a group encoded from a shared base position (groups.py): its K/V depend on its
text and base alone, not on who edits what. So connections that name the same text as context
share one copy: the store keys groups by (text digest, base position, model) in a cache of their
own and counts references. A connection that edits its context gets a private copy first (copy
on write, `edit`); the others keep the shared one, which goes when its last reference does.
Connections' own documents attend to these groups apart from their own caches (hydragen.py).

The budget (max_cache_tokens) covers every token the server holds: each shared group once, and
every connection's own documents, which it `track`s. Past it, whole groups go, least recently
used first: context groups before documents, a connection's active document last, never one a
running pass uses (PositionGroup.users). An evicted group keeps its text and is encoded again
when it is needed (`restore`).
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from .document import Document
from .host_memory import release_freed_memory

CONTEXT, DOCUMENT, ACTIVE = 0, 1, 2  # eviction ranks: lower goes first


@dataclass(eq=False)
class Member:
    """One group the budget counts: a shared context (doc held by the store) or a connection's
    own document. evict() drops its K/V (the owner keeps the text)."""
    rank: int
    doc: Document | None
    evict: Callable[[], None]
    used: float = field(default_factory=time.monotonic)

    def tokens(self) -> int:
        return self.doc.n if self.doc is not None else 0


@dataclass(eq=False)
class SharedGroup:
    """A context group and who refers to it: `refs` connections, or one after a copy on write
    (`key` None: no longer shareable)."""
    saved: str               # its text while it has no cache (evicted, or not placed yet)
    key: tuple | None
    member: Member
    refs: int = 0
    encoding: bool = False   # a stepper is encoding it: others wait for it (`settling`)

    @property
    def doc(self) -> Document | None:
        return self.member.doc

    @property
    def text(self) -> str:
        return self.doc.text if self.doc is not None else self.saved


class SharedContexts:
    """The server's shared context groups in one cache, and the budget over everything."""

    def __init__(self, engine, max_cache_tokens: int, base: int = 0, strategy: str = "pie"):
        self.engine, self.max_cache_tokens, self.base = engine, max_cache_tokens, base
        self.strategy = strategy if strategy != "lazy" else "pie"  # group attention wants no pending delta
        self.kv = engine.new_cache(1024)
        self.by_key: dict[tuple, SharedGroup] = {}   # the shareable ones, by text
        self.groups: list[SharedGroup] = []          # all of them, copies on write too
        self.members: list[Member] = []
        self.evictions = 0
        self.on_change: list[Callable[[SharedGroup], None]] = []  # views to relink when a group goes or returns
        self._ids = itertools.count(1)

    # -- groups ----------------------------------------------------------------------------------
    def key(self, text: str) -> tuple:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), self.base, self.engine.model_name

    def acquire(self, text: str) -> SharedGroup:
        """A reference to the group of this text: the existing one, or a new one to encode
        (`settling`). Raises ValueError when it could never fit the budget."""
        k = self.key(text)
        g = self.by_key.get(k)
        if g is None:
            g = SharedGroup(text, k, Member(CONTEXT, None, lambda: None))
            g.member.evict = lambda g=g: self._evict(g)
            self._place(g)
            self.by_key[k] = g
            self.groups.append(g)
            self.members.append(g.member)
            self.fit(keep=[g.member])
        elif g.doc is None:
            self.restore(g)
        g.refs += 1
        g.member.used = time.monotonic()
        return g

    def _place(self, g: SharedGroup) -> None:
        doc = Document(self.engine, f"livekv:context:{next(self._ids)}", g.saved, self.strategy, kv=self.kv,
                       pos0=self.base)
        room = self.max_cache_tokens
        if doc.n > room:
            doc.close()
            raise ValueError(f"a context file of {doc.n:,} tokens is more than the whole cache budget "
                             f"(maxCacheTokens {room:,}): raise --max-cache-tokens to use it")
        g.member.doc = doc

    def release(self, g: SharedGroup) -> None:
        """One reference fewer; the last one frees the group."""
        g.refs -= 1
        if g.refs > 0:
            return
        if g.key is not None and self.by_key.get(g.key) is g:
            del self.by_key[g.key]
        self.groups.remove(g)
        if g.member in self.members:
            self.members.remove(g.member)
        if g.doc is not None:
            g.doc.close()
            g.member.doc = None
        self._compact()

    def own(self, g: SharedGroup) -> SharedGroup:
        """The group of one connection that is about to change it: a copy of its own while
        others share g (copy on write; g keeps its text and K/V for them), else g itself, no
        longer shareable. The caller edits its document (Document.edit_batch)."""
        if g.doc is None:
            self.restore(g)
        if g.refs > 1:
            mine = SharedGroup(g.text, None, Member(CONTEXT, None, lambda: None), refs=1)
            mine.member.evict = lambda m=mine: self._evict(m)
            mine.member.doc = g.doc.copy(f"livekv:context:{next(self._ids)}", self.strategy, kv=self.kv)
            self.members.append(mine.member)
            self.groups.append(mine)
            g.refs -= 1
            g = mine
        elif g.key is not None:
            self.by_key.pop(g.key, None)
            g.key = None
        g.member.used = time.monotonic()
        return g

    def settling(self, g: SharedGroup, should_stop=None):
        """A stepper that encodes what g still lacks; while another stepper encodes it, this one
        waits a step at a time (yields None) and then finds it done."""
        while g.doc is not None and g.doc.dirty.any():
            if g.encoding:
                yield None
                continue
            g.encoding = True
            try:
                return (yield from g.doc.settling(should_stop))
            finally:
                g.encoding = False
        return True

    def restore(self, g: SharedGroup, keep=()) -> None:
        """An evicted group back, all its tokens to encode; the budget keeps `keep` (members
        the caller needs with it)."""
        if g.doc is None:
            self._place(g)
            if g.member not in self.members:
                self.members.append(g.member)
            for fn in self.on_change:
                fn(g)
        g.member.used = time.monotonic()
        self.fit(keep=[g.member, *keep])

    # -- the budget ------------------------------------------------------------------------------
    def track(self, doc: Document, evict: Callable[[], None], active: bool = False) -> Member:
        """Count a connection's own document in the budget; evict() is how its owner drops it."""
        m = Member(ACTIVE if active else DOCUMENT, doc, evict)
        self.members.append(m)
        return m

    def untrack(self, m: Member) -> None:
        if m in self.members:
            self.members.remove(m)

    def tokens(self) -> int:
        return sum(m.tokens() for m in self.members)

    def fit(self, keep=()) -> int:
        """Evict whole groups, least recently used first by rank, until the budget holds (or
        only groups in use, or in `keep`, are left). Returns how many went."""
        gone = 0
        over = self.tokens() - self.max_cache_tokens
        for m in sorted(self.members, key=lambda m: (m.rank, m.used)):
            if over <= 0:
                break
            if any(m is k for k in keep) or m.doc is None or m.doc.users:
                continue
            over -= m.tokens()
            m.evict()
            gone += 1
        self.evictions += gone
        if gone:
            self._compact()
            release_freed_memory()
        return gone

    def _evict(self, g: SharedGroup) -> None:
        g.saved = g.doc.text
        g.doc.close()
        g.member.doc = None
        for fn in self.on_change:
            fn(g)

    def _compact(self) -> None:
        """Close the holes freed groups left in the shared cache and give back its room. Not
        while a pass uses one of its groups: a pass that encodes one has its slots already (a
        pass that only reads them finds them where they are: hydragen.py)."""
        if any(g.doc is not None and g.doc.users for g in self.groups):
            return
        held = sum(g.member.tokens() for g in self.groups)
        if self.kv.top > 2 * max(held, 1024):
            self.kv.pack()
        self.kv.shrink()

    def stats(self) -> dict:
        """Server-wide counts, no text or uri of anyone's: shared_tokens are held once for
        several connections (saved_tokens: what they would hold each), private_tokens all the
        rest (documents, contexts only one connection has, copies on write)."""
        held = [g for g in self.groups if g.doc is not None]
        shared = sum(g.doc.n for g in held if g.refs > 1)
        return dict(shared_tokens=shared, private_tokens=self.tokens() - shared,
                    saved_tokens=sum((g.refs - 1) * g.doc.n for g in held if g.refs > 1),
                    tokens=self.tokens(), max_cache_tokens=self.max_cache_tokens, context_groups=len(held),
                    shared_groups=sum(g.refs > 1 for g in held), evicted_groups=len(self.groups) - len(held),
                    evictions=self.evictions, bytes_per_token=self.kv.bytes_per_token())
