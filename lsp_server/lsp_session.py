"""The LSP server's jobs on the worker thread: the shared Session (session.py), plus what only the
LSP server has: settings applied while it runs, where documents live (repoContext), and idle work.

Every `job_*` method runs on the worker thread as `fn(engine, *args)` (Worker.submit), so it may
touch the engine and the documents; nothing here speaks JSON-RPC.

Edits only mark new tokens dirty; they are encoded by the completion that needs them (within
maxPromptMs) or by `job_idle`, the low-priority job the server queues after each edit and each
completion, which any newer edit or request cancels: it prefetches the line after the
suggestion just shown, then encodes what is still dirty (the active document first, then the
context groups), then, under pie-refresh, re-encodes stale tokens, in slices short enough that a
cancellation is noticed within about maxPromptMs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from livekv.incremental import Config, Engine

from .idle import encode_idle
from .options import LspOptions, split_settings
from .protocol import json_safe
from .repo_context import place, rehome
from .session import Answer, Session
from .worker import Batch

log = logging.getLogger("livekv.lsp")

RELOAD = ("model", "device", "dtype")


class LspSession(Session):
    """Owned by the worker thread once the worker runs. `worker` is set right after the Worker
    is made (its thread reads `config` to load the model); the documents' home is made for the
    engine by the first job."""

    def __init__(self, config: Config, encoding: str = "utf-16", options: LspOptions | None = None,
                 roots: Sequence[Path] = ()):
        super().__init__(None, encoding)
        self.clamp = True  # as the LSP clients' own text documents do (vscode-languageserver-textdocument)
        self.config, self.options = config, options or LspOptions()
        self.roots = list(roots)  # the workspace folders: imports resolve inside them
        self.worker = None
        # to the client, as a warning or an error (set by the server)
        self.tell: Callable[[str, bool], None] = lambda message, error=False: None
        # read by the event loop for livekv/stats (plain ints and bools: no lock needed)
        self.idle = dict(jobs=0, interrupted=0, prefetches=0, prefetched=0, prefetch_cancelled=0, merged_changes=0,
                         tokens_encoded=0, tokens_refreshed=0, running=False, prefetching=False)

    def home(self, engine: Engine):
        if self.docs is None or self.docs.engine is not engine:
            self.docs = place(engine, self.config, self.options, self.roots)
        return self.docs

    # -- documents ---------------------------------------------------------------------------
    def job_open(self, engine: Engine, uri: str, text: str, version: int,
                 progress: Callable[[int, int], None] | None, should_stop: Callable[[], bool]) -> int:
        if self.home(engine).is_open(uri):
            log.warning("didOpen for %s, which is already open: re-opened with the new text", uri)
        n = self.open(uri, text, version, progress, should_stop).n
        if self.warning:
            self.tell(self.warning)
        return n

    def job_changes(self, engine: Engine, uri: str, batch: Batch) -> dict:
        """Every didChange for uri queued since this job was (Batch): one engine edit. Each
        notification that is refused is reported on its own, as if it had come alone."""
        self.home(engine)
        notifications = batch.take()
        stats, failures = self.change_many(uri, notifications, settle=False)
        for e in failures:
            self.tell(f"didChange {uri}: {e}", True)
        if self.warning:
            self.tell(self.warning)
        self.idle["merged_changes"] += len(notifications) - 1
        return stats

    def job_close(self, engine: Engine, uri: str) -> None:
        self.home(engine)
        self.close(uri)

    def job_complete(self, engine: Engine, uri: str, line: int, character: int, manual: bool,
                     should_stop: Callable[[], bool]) -> Answer | None:
        """The suggestions at the cursor (several for a manual trigger, when `candidates` > 1),
        or None when abandoned (cancelled, or the document changed since the request: its
        answer would be for text the client no longer has)."""
        self.home(engine)
        answer = self.complete(uri, line, character, n=self.options.candidates if manual else 1,
                               should_stop=should_stop)
        return None if answer is None or should_stop() else answer

    def job_stats(self, engine: Engine, uri: str, version: int | None) -> dict:
        self.home(engine)
        stats = self.stats(uri, version)
        stats["lsp_version"] = stats.pop("client_version")
        return json_safe(stats)

    # -- idle work ---------------------------------------------------------------------------
    def job_idle(self, engine: Engine, uri: str | None, prefetch: bool, should_stop: Callable[[], bool]) -> list[str]:
        """Low priority: prefetch for uri (after a completion), then encode dirty tokens, uri's
        first. Stops at the next token step or slice once should_stop() (any newer edit or request).
        Returns the open documents left with nothing to encode: a completion answered empty in
        one of them (refresh.py) would be answered now."""
        idle, docs = self.idle, self.home(engine)
        idle["jobs"] += 1
        idle["running"] = True
        try:
            if prefetch and self.options.prefetch and uri is not None and self.prefetch_due(uri):
                self._prefetch(uri, should_stop)
            encode_idle(docs, uri, should_stop, self._encoded, self._refreshed)
        finally:
            idle["running"] = False
            idle["interrupted"] += should_stop()
        return [u for u in self.versions if self.encoded(u)]

    def encoded(self, uri: str) -> bool:
        """Whether uri is open with no token left to encode (an evicted document has all of them)."""
        doc = self.docs.get(uri) if self.docs.is_open(uri) else None
        return doc is not None and not doc.dirty.any()

    def _encoded(self, n: int) -> None:  # after each slice: livekv/stats shows the progress
        self.idle["tokens_encoded"] += n

    def _refreshed(self, n: int) -> None:
        self.idle["tokens_refreshed"] += n

    def _prefetch(self, uri: str, should_stop: Callable[[], bool]) -> None:
        idle = self.idle
        idle["prefetches"] += 1
        idle["prefetching"] = True
        try:
            # no time caps: nobody waits for it, and a capped line would be appended as if whole
            got = self.prefetch(uri, should_stop, max_prompt_ms=0, max_predict_ms=0)
        finally:
            idle["prefetching"] = False
        if got:
            idle["prefetched"] += 1
        elif should_stop():
            idle["prefetch_cancelled"] += 1

    # -- settings ----------------------------------------------------------------------------
    def settings(self) -> dict:
        return dict(asdict(self.config), **asdict(self.options))

    def job_configure(self, engine: Engine, changes: dict) -> str:
        """Apply validated setting changes: reload the model (model/device/dtype), re-open the
        documents (strategy, precision, repoContext: job_idle encodes them, so their K/V are the
        new settings', not a mix) or apply a new budget, as needed. On any error the old
        settings and engine stay."""
        config_changes, option_changes = split_settings(changes)
        new = self.config.updated(**config_changes)  # ValueError: refused
        options = self.options.updated(**option_changes)
        old, before = self.config, self.settings()
        if new == old and options == self.options:
            return "settings unchanged"
        docs = self.home(engine)
        target = Engine.from_config(new) if any(getattr(new, f) != getattr(old, f) for f in RELOAD) else engine
        if target is engine and new.precision != old.precision:  # its weight formats now, not in a completion
            target.model.precision.prepare(new.precision)
        if (target is not engine or new.strategy != old.strategy or new.precision != old.precision
                or options.repo_context != self.options.repo_context):
            self.docs = docs = rehome(docs, place(target, new, options, self.roots))
        else:
            docs.set_budget(options.max_cache_tokens)
        # later jobs get the new engine: Worker passes `worker.engine` to each job
        self.worker.engine = target
        target.config = new  # the engine reads max_lines (and the defaults) from its config
        # suggestions made under the old settings are not what the new ones would show
        for doc in docs.documents():
            doc.typeahead.drop()
        self.shown.clear()
        self.config, self.options = new, options
        changed = {k: v for k, v in self.settings().items() if before[k] != v}
        return f"settings applied: {changed}"
