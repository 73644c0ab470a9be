"""Position groups: a shared prefix, context files, active documents, in one KV cache.

    prefix    positions [0, P)                  attends to itself
    context   positions [P, P + len) each       attends to the prefix and itself (parallel encoding)
    active    positions [P + span, ...)         attends to the prefix, every context, and itself
                                                (span: the longest context, doubled as it grows; kept
                                                small, since a model only knows positions it trained on)
    target    from φ (config.phi)               the completion's own tokens (decode.py)

Context groups share one base, so each is encoded independently of the others and its cache
survives edits anywhere else; an edit inside one shifts positions only inside it (PIE within the
group). Active documents start after `span` positions reserved for contexts, so a context that
grows never moves them, until it outgrows the span: then the active documents are moved by one
rotation of their keys, never re-encoded. A memory budget evicts whole context groups, least
recently used first; an evicted context is re-encoded when it is needed again.
"""
from __future__ import annotations

from collections import OrderedDict

from .document import Document
from .host_memory import release_freed_memory
from .strategies import check


class Workspace:
    """Groups over one engine. `open` an active document, `set_context` the files it should see."""

    def __init__(self, engine, prefix: str = "", span: int = 1024, max_cache_tokens: int = 200_000,
                 strategy: str | None = None):
        self.engine, self.span, self.max_cache_tokens = engine, span, max_cache_tokens
        self.strategy = check(engine.config.strategy if strategy is None else strategy)
        self.kv = engine.new_cache(1024)
        self.prefix = Document(engine, "livekv:prefix", prefix, "pie", kv=self.kv, pos0=0)
        self.prefix.settle()
        self.contexts: OrderedDict[str, Document] = OrderedDict()   # least recently used first
        self.evicted: dict[str, str] = {}                           # uri -> text, to re-encode on demand
        self.active: dict[str, Document] = {}
        self.evictions = 0

    # -- layout --------------------------------------------------------------------------------
    @property
    def context_base(self) -> int:
        return self.prefix.n

    @property
    def active_base(self) -> int:
        # with no context at all an active document starts right after the prefix, as it would alone
        return self.prefix.n + (self.span if self.contexts else 0)

    def _sees(self) -> list[Document]:
        return [self.prefix, *self.contexts.values()]

    def _relink(self, changed: bool) -> None:
        """Point every active document at the current groups; those that attended to a context
        that changed or went away are stale from then on."""
        sees = self._sees()
        for doc in self.active.values():
            doc.attend_to(sees)
            if doc.pos0 != self.active_base:  # contexts came or went: one rotation
                doc.move_to(self.active_base)
            if changed:
                doc.mark_stale()

    def activate(self, uri: str) -> Document:
        """Make a context group the active document (the file being edited): the active ones
        become context groups. Each moves by one rotation; what it attended to changed, so it is
        stale until refreshed, but nothing is re-encoded now."""
        if uri in self.active:
            return self.active[uri]
        doc = self.touch(uri)
        del self.contexts[uri]
        for other in list(self.active.values()):
            del self.active[other.uri]
            other.move_to(self.context_base)
            other.attend_to([self.prefix])
            other.mark_stale()
            self.contexts[other.uri] = other
        doc.move_to(self.active_base)
        self.active[uri] = doc
        doc.mark_stale()
        self._fit_span()
        self._relink(changed=False)
        return doc

    def _fit_span(self) -> None:
        longest = max((d.n for d in self.contexts.values()), default=0)
        if longest <= self.span:
            return
        new_span = 2 * longest
        delta = new_span - self.span
        self.span = new_span
        for doc in self.active.values():
            doc.move_to(doc.pos0 + delta)

    # -- groups --------------------------------------------------------------------------------
    def open(self, uri: str, text: str, strategy: str | None = None) -> Document:
        """An active document: it attends to the prefix and to every context group. It is also
        registered with the engine (engine.get(uri)), like Engine.open's documents."""
        if uri in self.active:
            self.close(uri)
        strategy = check(self.strategy if strategy is None else strategy)
        doc = Document(self.engine, uri, text, strategy, kv=self.kv, pos0=self.active_base, sees=self._sees())
        self.active[uri] = doc
        self.engine.documents[uri] = doc
        self._budget()
        doc.settle()
        return doc

    def set_context(self, uri: str, text: str, settle: bool = True) -> Document:
        """Add (or replace) a context group, encoded from the shared base (settle=False leaves
        the encoding to `settle`, which can be interrupted)."""
        if uri in self.contexts:
            self._drop_context(uri)
        self.evicted.pop(uri, None)
        doc = Document(self.engine, uri, text, self.strategy, kv=self.kv, pos0=self.context_base, sees=[self.prefix])
        room = self.max_cache_tokens - self.prefix.n
        if doc.n > room:  # it could never fit, whatever is evicted: refused, not kept over budget
            doc.close()
            per_1k = self.kv.bytes_per_token() * 1000 / 2**20
            raise ValueError(f"{uri} is {doc.n:,} tokens, more than the cache budget leaves for one file "
                             f"({room:,} of maxCacheTokens {self.max_cache_tokens:,}; {per_1k:.0f} MiB per 1,000 "
                             "tokens with this model): raise maxCacheTokens to open it")
        if settle:
            doc.settle()
        self.contexts[uri] = doc
        self._fit_span()
        self._relink(changed=True)
        self._budget(keep=uri)
        return doc

    def edit_context(self, uri: str, changes) -> dict:
        """Edit a context group: PIE inside the group; no other group moves."""
        doc = self.touch(uri)
        stats = doc.edit_batch(changes)
        self._fit_span()
        self._relink(changed=True)
        return stats

    def settle(self, should_stop=None) -> bool:
        """Encode what is still dirty, contexts first (the active documents attend to them).
        Returns False when should_stop() interrupted it."""
        for doc in [*self.contexts.values(), *self.active.values()]:
            if not doc.settle(should_stop):
                return False
        return True

    def touch(self, uri: str) -> Document:
        """Mark a group used (LRU); an evicted context is re-encoded here, on demand."""
        if uri in self.evicted:
            return self.set_context(uri, self.evicted[uri])
        if uri in self.contexts:
            self.contexts.move_to_end(uri)
            return self.contexts[uri]
        return self.active[uri]

    def close(self, uri: str) -> None:
        doc = self.active.pop(uri, None)
        if doc is not None:
            doc.close()
            if self.engine.documents.get(uri) is doc:
                del self.engine.documents[uri]
        closed = doc is not None
        if uri in self.contexts:
            self._drop_context(uri)
            self._relink(changed=True)
            closed = True
        self.evicted.pop(uri, None)
        if closed:
            self._compact()  # the caller gives the freed memory back (release_freed_memory) when it is idle

    def _compact(self) -> bool:
        """Close the holes freed groups left and give back the buffer room they no longer need."""
        if self.kv.top > 2 * max(self.tokens(), 1024):
            self.kv.pack()
        return self.kv.shrink()

    def _drop_context(self, uri: str) -> Document:
        doc = self.contexts.pop(uri)
        doc.close()
        return doc

    def tokens(self) -> int:
        return self.prefix.n + sum(d.n for d in self.contexts.values()) + sum(d.n for d in self.active.values())

    def set_budget(self, max_cache_tokens: int) -> None:
        """Change the memory budget: a lower one evicts at once."""
        self.max_cache_tokens = max_cache_tokens
        self._budget()

    def _budget(self, keep: str | None = None) -> None:
        """Evict whole context groups, least recently used first, until the cache fits."""
        changed = False
        while self.tokens() > self.max_cache_tokens:
            victim = next((u for u in self.contexts if u != keep), None)
            if victim is None:
                break
            self.evicted[victim] = self._drop_context(victim).text
            self.evictions += 1
            changed = True
        if changed:
            self._relink(changed=True)
        if self._compact() or changed:
            release_freed_memory()

    def stats(self) -> dict:
        """Memory and staleness per group."""
        per = self.kv.bytes_per_token()
        groups = [dict(uri=d.uri, kind=kind, tokens=d.n, bytes=d.n * per, position_base=d.pos0,
                       stale_tokens=int(d.stale.sum()))
                  for kind, docs in (("prefix", [self.prefix]), ("context", self.contexts.values()),
                                     ("active", self.active.values())) for d in docs]
        return dict(groups=groups, tokens=self.tokens(), bytes=self.tokens() * per, span=self.span,
                    max_cache_tokens=self.max_cache_tokens, evicted=sorted(self.evicted), evictions=self.evictions)
