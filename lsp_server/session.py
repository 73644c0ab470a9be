"""The LSP server's state on the worker thread: applied settings, LSP versions, and the jobs.

Every `job_*` method runs on the worker thread as `fn(engine, *args)` (Worker.submit), so it may
touch the engine and the documents (`self.docs`, repo_context.py); nothing here speaks JSON-RPC.
LSP positions arrive in the negotiated encoding and are converted here, against the text the
document has when the job runs (after every edit received before it), never on the event loop.

Edits only mark new tokens dirty; they are encoded by the completion that needs them (within
maxPromptMs) or by `job_idle`, the low-priority job the server queues after each edit and each
completion, which any newer edit or request cancels: it prefetches the line after the
suggestion just shown, then encodes what is still dirty (the active document first, then the
context groups), then, under pie-refresh, re-encodes stale tokens, in slices short enough that a
cancellation is noticed within about maxPromptMs.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from livekv.incremental import Config, Engine
from livekv.incremental.stops import Brackets, fit_to_line

from .positions import line_span, to_character, to_column
from .protocol import Options, json_safe, split_settings
from .idle import encode_idle
from .repo_context import place, rehome

log = logging.getLogger("livekv.lsp")

_BREAK = re.compile(r"\r|\n")
RELOAD = ("model", "device", "dtype")

# (start (line, character), end (line, character)) in the client's encoding; None: the whole text
Range = tuple[tuple[int, int], tuple[int, int]] | None


@dataclass
class Answer:
    texts: list[str]     # distinct, non-empty, best first
    character: int       # the cursor, in the client's encoding
    incomplete: bool     # maxPromptMs fired: nothing yet, ask again


@dataclass
class Shown:
    """What the server sent of the engine's typed-ahead entry (doc.typeahead.shown)."""
    entry: Any           # that entry (compared by identity: the engine makes a new one per suggestion)
    ends: list[int]      # where the suggestion and each prefetched line end in entry.text
    served: int          # where the last reply ended in entry.text


class Session:
    """Owned by the worker thread once the worker runs. `worker` is set right after the Worker
    is made (its thread reads `config` to load the model)."""

    def __init__(self, config: Config, encoding: str = "utf-16", options: Options | None = None,
                 roots: Sequence[Path] = ()):
        self.config, self.encoding = config, encoding
        self.options = options or Options()
        self.roots = list(roots)  # the workspace folders: imports resolve inside them
        self.worker = None
        self.docs = None  # repo_context.Grouped or Alone, made for the engine by the first job
        self.versions: dict[str, int] = {}
        self.shown: dict[str, Shown] = {}
        self.last: dict[str, dict] = {}       # uri -> the last completion answered (not a prefetch)
        self.prefetched: dict[str, dict] = {}  # uri -> the last prefetch
        # read by the event loop for livekv/stats (plain ints and bools: no lock needed)
        self.idle = dict(jobs=0, interrupted=0, prefetches=0, prefetched=0, prefetch_cancelled=0,
                         tokens_encoded=0, tokens_refreshed=0, running=False, prefetching=False)

    def forget(self, uri: str) -> None:
        for d in (self.versions, self.shown, self.last, self.prefetched):
            d.pop(uri, None)

    def documents(self, engine: Engine):
        if self.docs is None or self.docs.engine is not engine:
            self.docs = place(engine, self.config, self.options, self.roots)
        return self.docs

    # -- documents ---------------------------------------------------------------------------
    def job_open(self, engine: Engine, uri: str, text: str, version: int,
                 progress: Callable[[int, int], None] | None, should_stop: Callable[[], bool]) -> int:
        docs = self.documents(engine)
        if docs.is_open(uri):
            log.warning("didOpen for %s, which is already open: re-opened with the new text", uri)
        self.forget(uri)
        doc = docs.open(uri, text, progress=progress, should_stop=should_stop)
        self.versions[uri] = version
        return len(doc.token_ids)

    def job_change(self, engine: Engine, uri: str, version: int, changes: Sequence[tuple[Range, str]]) -> dict:
        """Apply one didChange notification's changes, in order, as one engine edit. The new
        tokens are encoded later (job_idle, or the next completion within maxPromptMs).

        Raises ValueError (document unchanged) for a stale version or an invalid change."""
        docs = self.documents(engine)
        text = docs.text(uri)  # KeyError: not open
        current = self.versions.get(uri)
        if current is not None and version <= current:
            raise ValueError(f"version {version} is not after its current version {current}: "
                             "the change was ignored and the document left unchanged")
        # Each change is relative to the text after the previous ones: convert against that text.
        edits, full = [], False
        for i, (rng, new) in enumerate(changes):
            if rng is None:  # whole document: earlier changes are overwritten
                text, edits, full = new, [], True
                continue
            try:
                (l1, c1), a = self._locate(text, *rng[0])
                (l2, c2), b = self._locate(text, *rng[1])
                if b < a:
                    raise ValueError(f"range end {rng[1]} is before its start {rng[0]}")
            except ValueError as e:
                raise ValueError(f"change {i + 1} of {len(changes)}: {e}; the document was left unchanged") from None
            edits.append(((l1, c1), (l2, c2), new))
            text = text[:a] + new + text[b:]
        doc = docs.activate(uri)  # the document being edited is the active one
        if full:  # one minimal splice of the final text (its later partial changes included)
            doc.set_text(text, settle=False)
        else:
            doc.edit_batch(edits, settle=False)
        self.versions[uri] = version
        return doc.stats

    def job_close(self, engine: Engine, uri: str) -> None:
        self.documents(engine).close(uri)  # KeyError: closing a document that is not open
        self.forget(uri)

    def _locate(self, text: str, line: int, character: int) -> tuple[tuple[int, int], int]:
        a, b = line_span(text, line)
        try:
            col = to_column(text[a:b], character, self.encoding)
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        return (line, col), a + col

    # -- completions -------------------------------------------------------------------------
    def job_complete(self, engine: Engine, uri: str, line: int, character: int, manual: bool,
                     should_stop: Callable[[], bool]) -> Answer | None:
        """The suggestions at the cursor (several for a manual trigger, when `candidates` > 1),
        or None when abandoned (cancelled, or the document changed since the request: its
        answer would be for text the client no longer has)."""
        if should_stop():
            return None
        docs = self.documents(engine)
        doc = docs.activate(uri)  # the document being completed is the active one
        a = doc.offset(line, 0)  # ValueError for a line out of range
        m = _BREAK.search(doc.text, a)
        line_text = doc.text[a: m.start() if m else len(doc.text)]
        try:
            col = to_column(line_text, character, self.encoding)
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        cfg = self.config
        decodes = doc.stats["completions"]
        with docs.view(doc):
            comp = doc.suggest(line, col, n=self.options.candidates if manual else 1, reuse=True,
                               max_new_tokens=cfg.max_new_tokens, should_stop=should_stop,
                               max_prompt_ms=cfg.max_prompt_ms, max_predict_ms=cfg.max_predict_ms,
                               multiline=cfg.multiline)
        texts = self._served(doc, comp)
        rest = line_text[col:]
        if rest.strip():
            context = Brackets()
            context.feed(doc.text[doc.statement_start(a + col): a + col])
            texts = [fit_to_line(context, t, rest) for t in texts]
            if uri in self.shown:  # accepting it ends no line: there is no next line to prefetch
                self.shown[uri].served = -1
        texts = [t for t in dict.fromkeys(texts) if t]
        self.last[uri] = dict(comp.summary(), text=texts[0] if texts else "", items=len(texts),
                              decodes=doc.stats["completions"] - decodes)
        if should_stop():
            return None
        return Answer(texts, to_character(line_text, col, self.encoding), comp.incomplete)

    def _served(self, doc, comp) -> list[str]:
        """The texts to send. A typed-ahead answer stops where its part ends: the rest of the
        suggestion being typed, else the prefetched line after it (one line at a time, as shown)."""
        entry = doc.typeahead.shown
        rec = self.shown.get(doc.uri)
        if rec is not None and rec.entry is not entry:  # dropped (typed past, diverged) or replaced
            del self.shown[doc.uri]
            rec = None
        if not comp.reused:
            if entry is not None and rec is None:  # the engine remembered this suggestion
                self.shown[doc.uri] = Shown(entry, [len(entry.text)], len(entry.text))
            return comp.texts
        if rec is None:
            return comp.texts
        typed = len(entry.text) - len(comp.text)
        rec.served = next((e for e in rec.ends if e > typed), len(entry.text))
        return [comp.text[: rec.served - typed]]

    # -- idle work ---------------------------------------------------------------------------
    def job_idle(self, engine: Engine, uri: str | None, prefetch: bool, should_stop: Callable[[], bool]) -> None:
        """Low priority: prefetch for uri (after a completion), then encode dirty tokens, uri's
        first. Stops at the next token step or slice once should_stop() (any newer edit or request)."""
        idle, docs = self.idle, self.documents(engine)
        idle["jobs"] += 1
        idle["running"] = True
        try:
            doc = docs.get(uri) if prefetch and self.options.prefetch and docs.is_open(uri) else None
            if doc is not None:
                with docs.view(doc):
                    self._prefetch(doc, should_stop)
            encode_idle(docs, uri, should_stop, self._encoded, self._refreshed)
        finally:
            idle["running"] = False
            idle["interrupted"] += should_stop()

    def _encoded(self, n: int) -> None:  # after each slice: livekv/stats shows the progress
        self.idle["tokens_encoded"] += n

    def _refreshed(self, n: int) -> None:
        self.idle["tokens_refreshed"] += n

    def _prefetch(self, doc, should_stop: Callable[[], bool]) -> None:
        rec = self.shown.get(doc.uri)
        # only when the person has been shown all that is known: one line ahead is enough
        if rec is None or rec.entry is not doc.typeahead.shown or rec.served < len(rec.entry.text):
            return
        idle, cfg = self.idle, self.config
        idle["prefetches"] += 1
        idle["prefetching"] = True
        before = doc.stats["last_prefetch"]  # the engine records each prefetch's decode apart
        try:
            # no time caps: nobody waits for it, and a capped line would be appended as if whole
            text = doc.prefetch(should_stop=should_stop, max_new_tokens=cfg.max_new_tokens, multiline=cfg.multiline,
                                max_prompt_ms=0, max_predict_ms=0)
        finally:
            idle["prefetching"] = False
        ran = doc.stats["last_prefetch"] is not before
        self.prefetched[doc.uri] = dict(doc.stats["last_prefetch"], text=text or "") if ran else None
        if text:
            rec.ends.append(len(rec.entry.text))
            idle["prefetched"] += 1
        elif should_stop():
            idle["prefetch_cancelled"] += 1

    def job_stats(self, engine: Engine, uri: str, version: int | None) -> dict:
        """A document's engine stats and `workspace` (its position groups, null when documents
        are alone). An evicted document has no cache: its stats say only that."""
        docs = self.documents(engine)
        text = docs.text(uri)  # KeyError: not open
        current = self.versions.get(uri)
        if version is not None and version != current:
            raise ValueError(f"{uri} is at version {current}, not {version}: "
                             "the client's text does not match the server's")
        # the digest lets a client check that the server holds exactly its text
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        common = dict(uri=uri, lsp_version=current, model=engine.model_name, text_sha256=digest,
                      workspace=docs.stats())
        doc = docs.get(uri)
        if doc is None:
            return json_safe(dict(common, evicted=True))
        tree = getattr(doc, "_syntax", None)  # not in the engine's stats; None until first needed
        stats = dict(doc.stats, **common, evicted=False, last_prefetch=self.prefetched.get(uri),
                     syntax_reparses=tree.reparses if tree else 0)
        if uri in self.last:  # the engine's last_completion may be a prefetch's
            stats["last_completion"] = self.last[uri]
        return json_safe(stats)

    # -- settings ----------------------------------------------------------------------------
    def settings(self) -> dict:
        return dict(asdict(self.config), **asdict(self.options))

    def job_configure(self, engine: Engine, changes: dict) -> str:
        """Apply validated setting changes: reload the model (model/device/dtype), re-open the
        documents (strategy, repoContext: job_idle encodes them) or apply a new budget, as
        needed. On any error the old settings and engine stay."""
        config_changes, option_changes = split_settings(changes)
        new = self.config.updated(**config_changes)  # ValueError: refused
        options = replace(self.options, **option_changes)
        old, before = self.config, self.settings()
        if new == old and options == self.options:
            return "settings unchanged"
        docs = self.documents(engine)
        target = Engine.from_config(new) if any(getattr(new, f) != getattr(old, f) for f in RELOAD) else engine
        if target is not engine or new.strategy != old.strategy or options.repo_context != self.options.repo_context:
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
