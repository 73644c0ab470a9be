"""Where the LSP server's documents live, and how the idle job encodes them (worker thread only).

repoContext on (the default): one incremental.groups.Workspace. The active document (the one
last edited or completed) attends to every context group: the other open documents and the
workspace files it imports (incremental.repo.imported_files, read from disk). Roles swap by one
rotation of keys (Workspace.activate). A budget (maxCacheTokens) evicts whole context groups,
least recently used first (didOpen, edits and completions use a group); an evicted group comes
back when a request needs it, all tokens to encode, as after a big edit: by the request within
its caps, else by the idle job.

Nothing a person waits for encodes a context: the idle job, which any edit or request
interrupts, resolves imports, reads them and encodes them. Until a group is encoded its cache
slots hold nothing, so `view` hides it from the active document.

repoContext off, or a model with FIM tokens (Workspace groups hold no FIM stream: keeping it
keeps today's completions): each document alone in engine.documents, as before.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

from pygls.uris import from_fs_path, to_fs_path

from livekv.incremental.groups import Workspace
from livekv.incremental.repo import imported_files

log = logging.getLogger("livekv.lsp")

MAX_IMPORT_BYTES = 256 * 1024  # an imported file larger than this is data or generated: not read
# Positions reserved for contexts before the active document (a longer context grows it). With
# Workspace's 8192, SmolLM2 (trained on 8192 positions) completes the active document with noise.
SPAN = 1024


def uri_path(uri: str) -> Path | None:
    path = to_fs_path(uri) if uri.startswith("file:") else None
    return Path(path).resolve() if path else None


def place(engine, config, options, roots: list[Path]):
    """The documents' home for these settings: Grouped, or Alone (repoContext off, FIM model)."""
    if options.repo_context and engine.fim_ids is not None and config.fim != "off":
        log.warning("repoContext is off for %s: its documents keep FIM streams, which position groups "
                    "do not hold; start the server with --fim off for repository context", engine.model_name)
    elif options.repo_context:
        return Grouped(engine, config.strategy, options.max_cache_tokens, roots)
    return Alone(engine, config.strategy)


def rehome(old, new):
    """Move the open documents (and which one is active) from old to new, a home for new
    settings; they are encoded again by the idle job."""
    texts, active = old.texts(), old.active_uri
    old.clear()
    for uri, text in texts.items():
        try:
            new.open(uri, text, settle=False)
        except Exception as e:  # one document never blocks the others, nor the settings
            log.error("%s could not be re-opened under the new settings (%s): it is closed; open it again", uri, e)
            active = None if active == uri else active
    if active is not None:
        new.activate(active)
    return new


class Alone:
    """Each document alone, with its own cache, registered with the engine as prefix + uri (a
    websocket connection's documents do not meet another's)."""
    active_uri = None

    def __init__(self, engine, strategy: str, prefix: str = ""):
        self.engine, self.strategy, self.prefix = engine, strategy, prefix

    def is_open(self, uri: str) -> bool:
        return self.prefix + uri in self.engine.documents

    def text(self, uri: str) -> str:
        return self.get(uri).text

    def open(self, uri: str, text: str, progress=None, should_stop=None, settle: bool = True):
        return self.engine.open(self.prefix + uri, text, strategy=self.strategy, settle=settle, progress=progress,
                                should_stop=should_stop)

    def get(self, uri: str):
        doc = self.engine.documents.get(self.prefix + uri)
        if doc is None:
            raise KeyError(f"document {uri!r} is not open; open it first")
        return doc

    activate = get

    def close(self, uri: str) -> None:
        self.get(uri)  # KeyError: closing a document that is not open
        self.engine.close(self.prefix + uri)

    def clear(self) -> None:
        for uri in self.texts():
            self.close(uri)

    def documents(self) -> list:
        return [d for u, d in self.engine.documents.items() if u.startswith(self.prefix)]

    def texts(self) -> dict[str, str]:
        n = len(self.prefix)
        return {u[n:]: d.text for u, d in self.engine.documents.items() if u.startswith(self.prefix)}

    def to_encode(self, uri: str | None, should_stop: Callable[[], bool]) -> Iterator:
        yield from sorted(self.documents(), key=lambda d: d.uri != self.prefix + (uri or ""))

    def view(self, doc):
        return nullcontext(doc)

    def set_budget(self, max_cache_tokens: int) -> None:
        pass

    def stats(self) -> None:
        return None


class Grouped:
    """Open documents and the active document's imports as groups of one Workspace."""

    def __init__(self, engine, strategy: str, max_cache_tokens: int, roots: list[Path]):
        self.engine, self.roots = engine, roots
        self.ws = Workspace(engine, span=SPAN, max_cache_tokens=max_cache_tokens, strategy=strategy)
        self.opened: set[str] = set()            # what the client has open
        self.imported: dict[str, Path] = {}      # contexts read from disk: the active file imports them
        self.resolved: tuple | None = None       # (active uri, its import names) last resolved
        self.reencoded = 0                       # evicted groups brought back on demand

    def is_open(self, uri: str) -> bool:
        return uri in self.opened

    def _need(self, uri: str) -> None:
        if uri not in self.opened:
            raise KeyError(f"document {uri!r} is not open; open it first")

    def text(self, uri: str) -> str:
        doc = self.get(uri)
        return doc.text if doc is not None else self.ws.evicted[uri]

    def open(self, uri: str, text: str, progress=None, should_stop=None, settle: bool = True):
        """A new context group (the most recently used); the active document when there is none
        yet. settle: encode it now, interruptibly (didOpen's first encode)."""
        ws = self.ws
        ws.close(uri)  # a re-open, or an imported file the client opened: the client's text wins
        self.imported.pop(uri, None)
        self.opened.discard(uri)
        try:  # all or nothing: a document is open once its group exists, never half
            doc = ws.set_context(uri, text, settle=False)
            if not ws.active:
                doc = ws.activate(uri)
        except BaseException:
            ws.close(uri)
            raise
        self.opened.add(uri)
        if settle:
            with self.view(doc):
                doc.settle(should_stop, progress=progress)
        return doc

    def activate(self, uri: str):
        """The document being edited or completed: the active one (the others become contexts)."""
        self._need(uri)
        ws = self.ws
        if uri in ws.active:
            return ws.active[uri]
        if uri in ws.evicted:  # back, all tokens dirty: encoded like an edit, within the request's caps
            ws.set_context(uri, ws.evicted[uri], settle=False)
            self.reencoded += 1
        return ws.activate(uri)

    def get(self, uri: str):
        """The document, without changing roles; None while it is evicted."""
        self._need(uri)
        return self.ws.active.get(uri) or self.ws.contexts.get(uri)

    def close(self, uri: str) -> None:
        # Dropped. If the active file imports it, the idle job reads it back from disk (the saved
        # text: the editor's unsaved changes went with the close).
        self._need(uri)
        self.opened.discard(uri)
        self.ws.close(uri)
        self.resolved = None

    def clear(self) -> None:
        for uri in [*self.ws.active, *self.ws.contexts, *self.ws.evicted]:
            self.ws.close(uri)
        self.opened.clear()
        self.imported.clear()

    @property
    def active_uri(self) -> str | None:
        return next(iter(self.ws.active), None)

    def documents(self) -> list:
        return [d for d in [*self.ws.active.values(), *self.ws.contexts.values()] if d.uri in self.opened]

    def texts(self) -> dict[str, str]:
        return {uri: self.text(uri) for uri in self.opened}

    def to_encode(self, uri: str | None, should_stop: Callable[[], bool]) -> Iterator:
        """For the idle job: the active document first (the next completion needs it), then its
        imports are brought up to date, then the contexts, most recently used first."""
        yield from list(self.ws.active.values())
        self.update_imports(should_stop)
        yield from reversed(list(self.ws.contexts.values()))

    def view(self, doc):
        """While doc encodes or decodes, hide the groups it sees that are not all encoded yet
        (their slots hold nothing). Its tokens encoded meanwhile never saw them: stale."""
        return doc.hiding([g for g in doc.sees if g.dirty.any()])

    def set_budget(self, max_cache_tokens: int) -> None:
        self.ws.set_budget(max_cache_tokens)

    # -- imports -------------------------------------------------------------------------------
    def _root(self, path: Path) -> Path | None:
        inside = [r for r in self.roots if r == path or r in path.parents]
        return max(inside, key=lambda r: len(r.parts), default=None)

    def update_imports(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Make the workspace files the active document imports context groups (read from
        disk, encoded later) and drop those it no longer imports. Resolved again only when the
        active document or its import statements change, or when should_stop() cut it short."""
        doc = next(iter(self.ws.active.values()), None)
        if doc is None:
            return
        path = uri_path(doc.uri)
        root = self._root(path) if path is not None else None
        tree = doc.syntax_tree() if root is not None else None
        key = (doc.uri, tuple(tree.imports()) if tree is not None else ())
        if key == self.resolved:
            return
        self.resolved = key
        files = imported_files(doc.text, path, root) if key[1] else []
        by_path = {uri_path(u): u for u in self.opened}
        wanted = {by_path.get(p) or from_fs_path(str(p)): p for p in files}
        ws = self.ws
        for uri in [u for u in self.imported if u not in wanted]:
            del self.imported[uri]
            ws.close(uri)
        for uri, p in reversed(list(wanted.items())):  # the first imports end most recently used
            if should_stop():  # reading and tokenizing a file takes a while: go on next time
                self.resolved = None
                return
            if uri in ws.active:
                continue
            if uri in ws.contexts:
                ws.touch(uri)
                continue
            self.reencoded += uri in ws.evicted
            text = ws.evicted[uri] if uri in self.opened else self._read(p)
            if text is not None:
                ws.set_context(uri, text, settle=False)
                if uri not in self.opened:
                    self.imported[uri] = p

    @staticmethod
    def _read(p: Path) -> str | None:
        try:
            if p.stat().st_size <= MAX_IMPORT_BYTES:
                return p.read_text(encoding="utf-8")
            log.info("not a context: %s is over %d bytes", p, MAX_IMPORT_BYTES)
        except (OSError, UnicodeDecodeError) as e:
            log.info("not a context: %s could not be read (%s)", p, e)
        return None

    # -- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Workspace.stats (memory per group, evictions) with each group's source and encoding."""
        ws, st = self.ws, self.ws.stats()
        docs = {ws.prefix.uri: ws.prefix, **ws.contexts, **ws.active}
        for g in st["groups"]:
            u = g["uri"]
            g.update(source="open" if u in self.opened else "import" if u in self.imported else "prefix",
                     dirty_tokens=int(docs[u].dirty.sum()))
        return dict(st, active=self.active_uri, imports=sorted(self.imported), reencoded=self.reencoded,
                    bytes_per_token=ws.kv.bytes_per_token(), roots=[str(r) for r in self.roots])
