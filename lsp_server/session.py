"""The LSP server's state on the worker thread: applied settings, LSP versions, and the jobs.

Every `job_*` method runs on the worker thread as `fn(engine, *args)` (Worker.submit), so it may
touch the engine and its documents; nothing here speaks JSON-RPC. LSP positions arrive in the
negotiated encoding and are converted here, against the text the document has when the job runs
(after every edit received before it), never on the event loop.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict
from typing import Any, Callable, Sequence

from incremental import Config, Engine

from .positions import line_span, to_character, to_column

log = logging.getLogger("livekv.lsp")

_BREAK = re.compile(r"\r|\n")
# LSP setting name -> Config field. Only these may change at run time.
SETTINGS = {"model": "model", "strategy": "strategy", "maxNewTokens": "max_new_tokens",
            "device": "device", "dtype": "dtype"}
RELOAD = ("model", "device", "dtype")

# (start (line, character), end (line, character)) in the client's encoding; None: the whole text
Range = tuple[tuple[int, int], tuple[int, int]] | None


def parse_settings(settings: Any) -> dict:
    """Config changes named by LSP settings: `{"livekv": {...}}` or the same keys at top level.

    Under "livekv" an unknown key is an error; at top level other keys belong to other tools and
    are ignored. ValueError says what was wrong; values are checked again by Config."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be an object, got {type(settings).__name__}")
    scoped = "livekv" in settings
    section = settings["livekv"] if scoped else settings
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"settings.livekv must be an object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(SETTINGS))
    if scoped and unknown:
        raise ValueError(f"unknown livekv setting(s) {unknown}: known are {sorted(SETTINGS)}")
    changes = {}
    for key, field in SETTINGS.items():
        if key not in section:
            continue
        value = section[key]
        if key == "maxNewTokens":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"maxNewTokens must be an integer, got {value!r}")
        elif key == "strategy":
            if not isinstance(value, str):
                raise ValueError(f"strategy must be a string, got {value!r}")
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string or null, got {value!r}")
        changes[field] = value
    return changes


def json_safe(x: Any) -> Any:
    """numpy scalars and tuples in engine stats -> plain JSON values."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    return x


class Session:
    """Owned by the worker thread once the worker runs. `worker` is set right after the Worker
    is made (its thread reads `config` to load the model)."""

    def __init__(self, config: Config, encoding: str = "utf-16"):
        self.config, self.encoding = config, encoding
        self.worker = None
        self.versions: dict[str, int] = {}

    # -- documents ---------------------------------------------------------------------------
    def job_open(self, engine: Engine, uri: str, text: str, version: int,
                 progress: Callable[[int, int], None] | None, should_stop: Callable[[], bool]) -> int:
        if uri in engine.documents:
            log.warning("didOpen for %s, which is already open: re-opened with the new text", uri)
        doc = engine.open(uri, text, strategy=self.config.strategy, progress=progress, should_stop=should_stop)
        self.versions[uri] = version
        return len(doc.token_ids)

    def job_change(self, engine: Engine, uri: str, version: int, changes: Sequence[tuple[Range, str]],
                   should_stop: Callable[[], bool]) -> dict:
        """Apply one didChange notification's changes, in order, as one engine edit.

        Raises ValueError (document unchanged) for a stale version or an invalid change."""
        doc = engine.get(uri)
        current = self.versions.get(uri)
        if current is not None and version <= current:
            raise ValueError(f"version {version} is not after its current version {current}: "
                             "the change was ignored and the document left unchanged")
        # Each change is relative to the text after the previous ones: convert against that text.
        text, edits, full = doc.text, [], False
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
        if full:  # one minimal splice of the final text (its later partial changes included)
            doc.set_text(text, should_stop=should_stop)
        else:
            doc.edit_batch(edits, should_stop=should_stop)
        self.versions[uri] = version
        return doc.stats

    def job_close(self, engine: Engine, uri: str) -> None:
        engine.get(uri)  # KeyError: closing a document that is not open
        engine.close(uri)
        self.versions.pop(uri, None)

    def _locate(self, text: str, line: int, character: int) -> tuple[tuple[int, int], int]:
        a, b = line_span(text, line)
        try:
            col = to_column(text[a:b], character, self.encoding)
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        return (line, col), a + col

    # -- completions -------------------------------------------------------------------------
    def job_complete(self, engine: Engine, uri: str, line: int, character: int,
                     should_stop: Callable[[], bool]) -> tuple[str, int] | None:
        """(text, character of the cursor) or None when abandoned (cancelled, or the document
        changed since the request: its answer would be for text the client no longer has)."""
        if should_stop():
            return None
        doc = engine.get(uri)
        a = doc.offset(line, 0)  # ValueError for a line out of range
        m = _BREAK.search(doc.text, a)
        line_text = doc.text[a: m.start() if m else len(doc.text)]
        try:
            col = to_column(line_text, character, self.encoding)
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        pieces = list(doc.stream(line, col, max_new_tokens=self.config.max_new_tokens, should_stop=should_stop))
        if should_stop():
            return None
        return "".join(pieces), to_character(line_text, col, self.encoding)

    def job_stats(self, engine: Engine, uri: str, version: int | None) -> dict:
        doc = engine.get(uri)
        current = self.versions.get(uri)
        if version is not None and version != current:
            raise ValueError(f"{uri} is at version {current}, not {version}: "
                             "the client's text does not match the server's")
        # the digest lets a client check that the server holds exactly its text
        digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()
        return json_safe(dict(doc.stats, lsp_version=current, model=engine.model_name, text_sha256=digest))

    # -- settings ----------------------------------------------------------------------------
    def job_configure(self, engine: Engine, changes: dict) -> str:
        """Apply validated Config changes: reload the model (model/device/dtype) or re-open
        documents (strategy) as needed. On any error the old settings and engine stay."""
        new = self.config.updated(**changes)  # ValueError: refused
        old = self.config
        if new == old:
            return "settings unchanged"
        texts = {uri: doc.text for uri, doc in engine.documents.items()}
        if any(getattr(new, f) != getattr(old, f) for f in RELOAD):
            fresh = Engine.from_config(new)
            for uri, text in texts.items():
                fresh.open(uri, text, strategy=new.strategy)
            # later jobs get the new engine: Worker passes `worker.engine` to each job
            self.worker.engine = fresh
        elif new.strategy != old.strategy:
            for uri, text in texts.items():
                engine.open(uri, text, strategy=new.strategy)
        self.config = new
        changed = {k: v for k, v in asdict(new).items() if asdict(old)[k] != v}
        return f"settings applied: {changed}"
