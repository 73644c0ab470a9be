"""One editor's session on the worker thread: its documents and their versions, positions in the
client's encoding, completions and what was shown of them, and stats.

Both servers are layers over this: the LSP server's LspSession (lsp_session.py) and every
websocket connection (ws_session.py). So a cursor gets the same answer from either, and from
`livekv complete`: the engine fits a suggestion to the rest of the line (stops.py), and the
typed-ahead rest of a suggestion is served here, one part at a time, as it was shown.

Positions arrive in the client's encoding (utf-16 for LSP by default and for the websocket,
utf-8 or utf-32 when an LSP client negotiates it) and are converted against the text the
document has when the job runs, after every edit received before it (lines.py).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from livekv.incremental import batch
from livekv.incremental.host_memory import release_freed_memory
from livekv.incremental.lines import resolve
from livekv.incremental.stops import line_rest

log = logging.getLogger("livekv.session")

# (start (line, character), end (line, character)) in the client's encoding; None: the whole text
Range = tuple[tuple[int, int], tuple[int, int]] | None
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON decoding pairs the others up


def replace_lone_surrogates(text: str) -> tuple[str, int]:
    """(text with each lone UTF-16 surrogate replaced by U+FFFD, how many). A lone surrogate
    cannot be tokenized (nor written as UTF-8); U+FFFD is one code point and one UTF-16 unit
    too, so every position the client sends still means the same place."""
    if text.isascii():
        return text, 0
    return LONE_SURROGATE.subn("\ufffd", text)


class VersionError(ValueError):
    """An edit whose version is not after the document's: ignored, the document unchanged."""


@dataclass
class Answer:
    texts: list[str]     # distinct, non-empty, best first
    character: int       # the cursor, in the client's encoding
    incomplete: bool     # maxPromptMs fired: nothing yet, ask again
    stop: str            # why decoding stopped (Completion.stop)


@dataclass
class Shown:
    """What was sent of the engine's typed-ahead entry (doc.typeahead.shown)."""
    entry: Any           # that entry (compared by identity: the engine makes a new one per suggestion)
    ends: list[int]      # where the suggestion and each prefetched line end in entry.text
    served: int          # where the last reply ended in entry.text; -1: mid-line, no next line


class Session:
    """docs: where the documents live (repo_context.Alone or Grouped); encoding: the client's."""

    def __init__(self, docs, encoding: str = "utf-16"):
        self.docs, self.encoding = docs, encoding
        self.clamp = False  # a character past a line's end: an error, or (LSP) the line's end
        self.versions: dict[str, int] = {}
        self.shown: dict[str, Shown] = {}
        self.last: dict[str, dict] = {}        # uri -> the last completion answered (not a prefetch)
        self.prefetched: dict[str, dict | None] = {}  # uri -> the last prefetch
        self.replaced: dict[str, int] = {}     # uri -> lone surrogates replaced in its text so far
        self.warning: str | None = None        # what the last open or change had to alter, for the client

    def forget(self, uri: str) -> None:
        for d in (self.versions, self.shown, self.last, self.prefetched, self.replaced):
            d.pop(uri, None)

    def _clean(self, uri: str, texts: list[str]) -> list[str]:
        out, n = [], 0
        for t in texts:
            t, k = replace_lone_surrogates(t)
            out.append(t)
            n += k
        self.warning = None
        if n:
            self.replaced[uri] = self.replaced.get(uri, 0) + n
            self.warning = (f"{uri}: {n} lone UTF-16 surrogate(s) in the text were stored as U+FFFD (they cannot be "
                            "tokenized); positions are unchanged, but the server's text_sha256 differs from yours")
            log.warning("%s", self.warning)
        return out

    # -- documents ---------------------------------------------------------------------------
    def open(self, uri: str, text: str, version: int, progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, settle: bool = True, **where):
        """Open (or re-open, replacing) a document; settle: encode it now, interruptibly. All or
        nothing: when it fails the document is not open (a re-open's old text is gone too).
        where: what the documents' home takes besides (connection_docs: a context's role)."""
        (text,) = self._clean(uri, [text])
        warning, replaced = self.warning, self.replaced.get(uri, 0)
        try:
            doc = self.docs.open(uri, text, progress=progress, should_stop=should_stop, settle=settle, **where)
        except BaseException:
            if not self.docs.is_open(uri):
                self.forget(uri)
            raise
        self.forget(uri)
        self.versions[uri], self.warning = version, warning
        if replaced:
            self.replaced[uri] = replaced
        return doc

    def change(self, uri: str, version: int, changes: Sequence[tuple[Range, str]], settle: bool = False) -> dict:
        """Apply one notification's changes, in order, as one engine edit (with settle=False the
        new tokens are encoded later: the idle job, or the next completion within maxPromptMs).

        Raises VersionError for a version not after the current one, ValueError for an invalid
        change, KeyError for a document not open; the document is left unchanged."""
        stats, failures = self.change_many(uri, [(version, changes)], settle)
        if failures:
            raise failures[0]
        return stats

    def change_many(self, uri: str, notifications: Sequence[tuple[int, Sequence[tuple[Range, str]]]],
                    settle: bool = False) -> tuple[dict, list[ValueError]]:
        """Several notifications' changes (version, changes), in order, as ONE engine edit: each
        cached key moves at most once however many there are (an edit storm). A notification
        that is invalid (VersionError, ValueError) is skipped, as if it had come alone, and
        returned among the failures; KeyError for a document not open."""
        text = self.docs.text(uri)
        current = self.versions.get(uri)
        edits, whole, failures, warnings, applied = [], False, [], [], False
        for version, changes in notifications:
            if current is not None and version <= current:
                failures.append(VersionError(f"version {version} is not after its current version {current}: "
                                             "the change was ignored and the document left unchanged"))
                continue
            changes = list(zip([r for r, _ in changes], self._clean(uri, [t for _, t in changes])))
            warnings += [self.warning] if self.warning else []
            try:
                final, got = resolve(text, changes, self.encoding, self.clamp)
            except ValueError as e:
                failures.append(e)
                continue
            whole |= got is None
            edits += got or []
            text, current, applied = final, version, True
        self.warning = "; ".join(warnings) or None
        if not applied:
            return self.docs.get(uri).stats if self.docs.get(uri) is not None else {}, failures
        doc = self.docs.activate(uri)  # the document being edited is the active one
        if whole:  # one minimal splice of the final text (the other changes included)
            doc.set_text(text, settle=settle)
        elif edits:
            doc.edit_batch(edits, settle=settle)
        self.versions[uri] = current
        return doc.stats, failures

    def close(self, uri: str) -> None:
        self.docs.close(uri)  # KeyError: closing a document that is not open
        self.forget(uri)
        release_freed_memory()  # its cache, and the encode temporaries the malloc tuning kept mapped

    # -- completions -------------------------------------------------------------------------
    def complete(self, uri: str, line: int, character: int, n: int = 1, should_stop: Callable[[], bool] | None = None,
                 on_piece: Callable[[str], None] | None = None, **caps) -> Answer | None:
        """The suggestions at the cursor (several when n > 1); on_piece(text) streams the first
        as it is decoded. None when should_stop() before any work (cancelled, or the document
        changed since the request). caps: as Document.suggest (max_new_tokens, max_prompt_ms...)."""
        return batch.alone(self.docs.engine.model, self.completing(uri, line, character, n, should_stop, on_piece,
                                                                   **caps))

    def completing(self, uri: str, line: int, character: int, n: int = 1,
                   should_stop: Callable[[], bool] | None = None, on_piece: Callable[[str], None] | None = None,
                   **caps):
        """complete as a stepper (incremental/batch.py), for the worker to batch with others."""
        self.docs.text(uri)  # KeyError: not open
        if should_stop is not None and should_stop():
            return None
        doc = self.docs.activate(uri)  # the document being completed is the active one
        c = doc.offset(line, character, self.encoding, self.clamp)  # ValueError: not a position
        col = doc.position(c)[1]
        character = doc.position(c, self.encoding)[1]  # clamped: the suggestion goes at the line's end
        decodes = doc.stats["completions"]
        with self.docs.view(doc):
            comp = yield from doc.suggesting(line, col, n=n, reuse=True, should_stop=should_stop, on_piece=on_piece,
                                             **caps)
        texts = self._served(uri, doc, comp)
        if comp.reused and on_piece is not None and texts[0]:
            on_piece(texts[0])
        if line_rest(doc, c).strip() and uri in self.shown:
            self.shown[uri].served = -1  # mid-line: accepting it ends no line, there is no next one
        texts = [t for t in dict.fromkeys(texts) if t]
        self.last[uri] = dict(comp.summary(), text=texts[0] if texts else "", items=len(texts),
                              decodes=doc.stats["completions"] - decodes)
        return Answer(texts, character, comp.incomplete, comp.stop)

    def _served(self, uri: str, doc, comp) -> list[str]:
        """The texts to send. A typed-ahead answer stops where its part ends: the rest of the
        suggestion being typed, else the prefetched line after it (one line at a time, as shown)."""
        entry = doc.typeahead.shown
        rec = self.shown.get(uri)
        if rec is not None and rec.entry is not entry:  # dropped (typed past, diverged) or replaced
            del self.shown[uri]
            rec = None
        if not comp.reused:
            if entry is not None and rec is None:  # the engine remembered this suggestion
                self.shown[uri] = Shown(entry, [len(entry.text)], len(entry.text))
            return comp.texts
        if rec is None:
            return comp.texts
        typed = len(entry.text) - len(comp.text)
        rec.served = next((e for e in rec.ends if e > typed), len(entry.text))
        return [comp.text[: rec.served - typed]]

    def prefetch_due(self, uri: str) -> bool:
        """Whether the line after the suggestion last shown for uri is worth decoding now: the
        person has been shown all that is known of it (one line ahead is enough)."""
        rec = self.shown.get(uri)
        doc = self.docs.get(uri) if self.docs.is_open(uri) else None
        return doc is not None and rec is not None and rec.entry is doc.typeahead.shown and \
            rec.served >= len(rec.entry.text)

    def prefetch(self, uri: str, should_stop: Callable[[], bool], **caps) -> bool:
        """Decode the line after the suggestion last shown, as if it were accepted (prefetch_due
        first); True when a line came back, to be served when the person gets there."""
        doc, rec = self.docs.get(uri), self.shown[uri]
        before = doc.stats["last_prefetch"]  # the engine records each prefetch's decode apart
        with self.docs.view(doc):
            text = doc.prefetch(should_stop=should_stop, **caps)
        ran = doc.stats["last_prefetch"] is not before
        self.prefetched[uri] = dict(doc.stats["last_prefetch"], text=text or "") if ran else None
        if text:
            rec.ends.append(len(rec.entry.text))
        return bool(text)

    # -- stats ---------------------------------------------------------------------------------
    def stats(self, uri: str, version: int | None = None) -> dict:
        """A document's engine stats, its client version, the digest of its text (a client can
        check the server holds exactly its text) and `workspace` (its position groups; None when
        documents are alone). An evicted document has no cache: its stats say only that."""
        text = self.docs.text(uri)  # KeyError: not open
        current = self.versions.get(uri)
        if version is not None and version != current:
            raise ValueError(f"{uri} is at version {current}, not {version}: "
                             "the client's text does not match the server's")
        common = dict(uri=uri, client_version=current, model=self.docs.engine.model_name,
                      replaced_surrogates=self.replaced.get(uri, 0),
                      text_sha256=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
                      workspace=self.docs.stats())
        doc = self.docs.get(uri)
        if doc is None:
            return dict(common, evicted=True)
        stats = dict(doc.stats, **common, evicted=False, last_prefetch=self.prefetched.get(uri))
        if uri in self.last:  # the engine's last_completion may be a prefetch's
            stats["last_completion"] = self.last[uri]
        return stats
