"""Where one websocket connection's documents live: its own files, each in a cache of its own, and
the context files it named, as references to the server's shared groups (incremental/shared.py).

A connection's own documents attend to every one of its context files. Contexts are encoded from
position 0, each independently (groups.py's layout), so the same text is the same group for
every connection that has it; its own documents start after `span` positions reserved for them
(1024, doubled past the longest context), or at 0 while it has no context, as before. Adding,
editing or dropping a context moves its documents by one rotation when the span changes, and
marks them stale (they attended to what was there before), as Workspace does for the LSP server.

Editing a context file makes this connection's reference its own (SharedContexts.own: a copy on
write when others share it). Nothing here names another connection's documents: engine uris are
"<cid>:<uri>", and a shared group is reached only through a uri this connection opened it under.
One memory budget covers the whole server (SharedContexts.fit): an evicted document of this
connection keeps its text and is encoded again when it is edited or completed.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

from livekv.incremental.document import Document
from livekv.incremental.shared import ACTIVE, DOCUMENT, SharedContexts, SharedGroup

SPAN = 1024  # positions reserved for contexts before a connection's own documents (repo_context.SPAN)


class ConnectionDocs:
    """The documents home (as repo_context.Alone / Grouped) of one websocket connection."""

    def __init__(self, engine, strategy: str, store: SharedContexts, prefix: str):
        self.engine, self.strategy, self.store, self.prefix = engine, strategy, store, prefix
        self.contexts: dict[str, SharedGroup] = {}
        self.own: dict[str, Document] = {}
        self.evicted: dict[str, str] = {}          # own documents the budget dropped: uri -> text
        self.members: dict[str, object] = {}       # own uri -> its budget Member
        self.active_uri: str | None = None
        self.span = SPAN
        store.on_change.append(self._changed)

    # -- reading -----------------------------------------------------------------------------
    def is_open(self, uri: str) -> bool:
        return uri in self.own or uri in self.evicted or uri in self.contexts

    def is_context(self, uri: str) -> bool:
        return uri in self.contexts

    def _need(self, uri: str) -> None:
        if not self.is_open(uri):
            raise KeyError(f"document {uri!r} is not open; open it first")

    def text(self, uri: str) -> str:
        self._need(uri)
        if uri in self.contexts:
            return self.contexts[uri].text
        return self.evicted[uri] if uri in self.evicted else self.own[uri].text

    def get(self, uri: str):
        """The document (a context's group); None while the budget has it evicted."""
        self._need(uri)
        return self.contexts[uri].doc if uri in self.contexts else self.own.get(uri)

    def documents(self) -> list:
        return list(self.own.values())

    def texts(self) -> dict[str, str]:
        return {u: self.text(u) for u in [*self.own, *self.evicted, *self.contexts]}

    def view(self, doc):
        return nullcontext(doc)

    # -- documents -----------------------------------------------------------------------------
    def open(self, uri: str, text: str, progress=None, should_stop=None, settle: bool = True,
             role: str = "document"):
        """Open (or re-open) uri: one of this connection's documents, or (role "context") a
        context file its documents see. Not encoded here (settle=False): the caller's job encodes
        it (`settling`), so it joins the batch; settle=True encodes it now."""
        if self.is_open(uri):
            self.close(uri)
        if role == "context":
            if self.engine.fim_ids is not None and self.engine.config.fim != "off":
                raise ValueError(f"context files need a model without FIM tokens, or --fim off ({self.engine.model_name} "
                                 "keeps each document as a FIM stream, which does not see groups)")
            self.contexts[uri] = self.store.acquire(text)
            doc = self.contexts[uri].doc
            self.relink()
        else:
            doc = self._place(uri, text)
        if settle:
            doc.settle(should_stop, progress=progress)
        return doc

    def settling(self, uri: str, should_stop=None, edit: bool = False):
        """A stepper that encodes what uri still lacks (a context: once for every connection
        that has it); edit: it finishes an edit (Document.settling)."""
        if uri in self.contexts:
            done = yield from self.store.settling(self.contexts[uri], should_stop)
            if edit:
                self.relink()  # the context changed: the documents that see it are stale
            return done
        return (yield from self.own[uri].settling(should_stop, edit=edit))

    def contexts_settling(self, should_stop=None):
        """A stepper that brings back this connection's evicted contexts and encodes what they
        lack, before its documents are used (an edit, a completion)."""
        for g in list(self.contexts.values()):
            if g.doc is None:
                self.store.restore(g, keep=self._working_set())
            g.member.used = time.monotonic()
            if not (yield from self.store.settling(g, should_stop)):
                return False
        return True

    def _place(self, uri: str, text: str) -> Document:
        if self.engine.fim_ids is not None and self.engine.config.fim != "off":
            doc = self.engine.open(self.prefix + uri, text, strategy=self.strategy, settle=False)
        else:
            doc = Document(self.engine, self.prefix + uri, text, self.strategy, pos0=self._base(),
                           sees=self._groups())
            self.engine.documents[self.prefix + uri] = doc
        self.own[uri] = doc
        self.evicted.pop(uri, None)
        m = self.members.get(uri)
        if m is None:
            self.members[uri] = m = self.store.track(doc, lambda u=uri: self._evict(u))
        m.doc = doc
        self.store.fit(keep=[m, *self._working_set()])
        return doc

    def activate(self, uri: str):
        """The document about to be edited or completed: this connection's active one (evicted
        last); an evicted one comes back, all tokens to encode; a context becomes this
        connection's own copy (copy on write)."""
        self._need(uri)
        if uri in self.contexts:
            g = self.contexts[uri] = self.store.own(self.contexts[uri])
            self.relink()
            return g.doc
        doc = self.own.get(uri) or self._place(uri, self.evicted[uri])
        for u, m in self.members.items():
            m.rank = ACTIVE if u == uri else DOCUMENT
        self.members[uri].used = time.monotonic()
        self.active_uri = uri
        return doc

    def close(self, uri: str) -> None:
        self._need(uri)
        if uri in self.contexts:
            self.store.release(self.contexts.pop(uri))
            self.relink()
            return
        self.evicted.pop(uri, None)
        self.store.untrack(self.members.pop(uri))
        if self.own.pop(uri, None) is not None:
            self.engine.close(self.prefix + uri)
        if self.active_uri == uri:
            self.active_uri = None

    def clear(self) -> None:
        for uri in [*self.own, *self.evicted, *self.contexts]:
            if self.is_open(uri):
                self.close(uri)
        if self._changed in self.store.on_change:
            self.store.on_change.remove(self._changed)

    def _evict(self, uri: str) -> None:
        doc = self.own.pop(uri)
        self.evicted[uri] = doc.text
        self.members[uri].doc = None
        self.engine.close(self.prefix + uri)

    # -- contexts ------------------------------------------------------------------------------
    def _working_set(self) -> list:
        """What this connection's next edit or completion needs: its contexts and active document."""
        ms = [g.member for g in self.contexts.values()]
        return ms + ([self.members[self.active_uri]] if self.active_uri in self.members else [])

    def _groups(self) -> list:
        return [g.doc for g in self.contexts.values() if g.doc is not None]

    def _base(self) -> int:
        return self.span if self.contexts else 0

    def _changed(self, g: SharedGroup) -> None:
        """The store evicted or restored a group: relink if it is one of this connection's."""
        if any(mine is g for mine in self.contexts.values()):
            self.relink()

    def relink(self) -> None:
        """Point the own documents at the current contexts (one rotation when their base moves);
        they attended to something else before: stale."""
        longest = max((g.doc.n for g in self.contexts.values() if g.doc is not None), default=0)
        while longest > self.span:
            self.span *= 2
        groups, base = self._groups(), self._base()
        for doc in self.own.values():
            if doc.engine.fim_ids is not None and doc.engine.config.fim != "off":
                continue
            doc.attend_to(groups)
            if doc.pos0 != base:
                doc.move_to(base)
            doc.mark_stale()

    def set_budget(self, max_cache_tokens: int) -> None:
        self.store.max_cache_tokens = max_cache_tokens
        self.store.fit()

    def stats(self) -> dict:
        """This connection's view (its contexts: shared or its own) and the server's counts."""
        ctx = {u: dict(tokens=g.doc.n if g.doc is not None else 0, shared=g.refs > 1 and g.key is not None,
                       evicted=g.doc is None) for u, g in self.contexts.items()}
        return dict(contexts=ctx, span=self.span, active=self.active_uri, evicted=sorted(self.evicted),
                    server=self.store.stats())
