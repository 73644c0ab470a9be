"""The LSP handlers: each turns one message into worker jobs (session.py) on a LivekvServer.

Notifications queue their job in their (synchronous) handler; requests queue theirs in an
`on_arrival` start (protocol.py) and their async handler awaits it. Every message a person may
be waiting on (edits, opens, closes, settings, completion requests) first interrupts the idle
work; each edit and each answered completion then queues new idle work (LivekvServer.schedule_idle).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsprotocol import types as T
from pygls.exceptions import JsonRpcInvalidParams
from pygls.uris import to_fs_path

from livekv.incremental import Engine

from .lsp_session import LspSession
from .options import split_settings
from .protocol import error_message, on_arrival, parse_settings, plain, work_done_progress
from .worker import Worker

if TYPE_CHECKING:
    from .server import LivekvServer

log = logging.getLogger("livekv.lsp")
STATS = "livekv/stats"
FEATURES: list[tuple[str, Any, Any]] = []  # (method, options, handler)


def feature(name: str, options: Any = None):
    """Collect a handler; build_server registers it (pygls cannot register bound methods)."""
    def deco(f):
        FEATURES.append((name, options, f))
        return f
    return deco


def workspace_roots(params: T.InitializeParams) -> list[Path]:
    """The workspace folders (workspaceFolders, else rootUri or rootPath): imports resolve there."""
    uris = [f.uri for f in params.workspace_folders or []] or [params.root_uri]
    paths = [to_fs_path(u) for u in uris if u] or [params.root_path]
    return [Path(p).resolve() for p in paths if p]


# -- lifecycle ---------------------------------------------------------------------------------
@feature(T.INITIALIZE)
def initialize(ls: LivekvServer, params: T.InitializeParams):
    ls.loop = asyncio.get_running_loop()
    config, options = ls.base_config, ls.base_options
    try:
        config_changes, option_changes = split_settings(parse_settings(params.initialization_options))
        config, options = config.updated(**config_changes), options.updated(**option_changes)
    except ValueError as e:
        ls.report(f"livekv: initializationOptions refused ({e}); using {asdict(config)}", show=True)
    encoding = str(getattr(ls.workspace.position_encoding, "value", ls.workspace.position_encoding) or "utf-16")
    base = ls.base_config

    def load():  # on the worker thread, before its first job
        tries = [ls.session.config] + ([base] if ls.session.config != base else [])
        for cfg in tries:
            try:
                engine = Engine.from_config(cfg)
                ls.session.config = cfg
                return engine
            except Exception as e:
                error = e
                then = "; falling back to the command line's settings" if cfg is not tries[-1] else ""
                ls.later(ls.report, f"livekv: could not load model {cfg.model or 'smollm2-135m'} on "
                                    f"{cfg.device or 'the default device'}: {e}{then}", T.MessageType.Error, True)
        raise error

    ls.session = LspSession(config, encoding, options, workspace_roots(params))
    ls.session.tell = lambda message, error=False: ls.later(
        ls.report, message if error else f"livekv: {message}", T.MessageType.Error if error else T.MessageType.Warning,
        not error)
    ls.worker = ls.session.worker = Worker(load)  # loads the model on its thread, now
    log.info("initialized: position encoding %s, workspace %s, settings %s", encoding,
             [str(r) for r in ls.session.roots], ls.session.settings())


@feature(T.SHUTDOWN)
def shutdown(ls: LivekvServer, params):
    # Answer now: a running decode sees should_stop() at its next token step, queued jobs drop.
    ls.shutdown_requested = True
    if ls.worker is not None:
        ls.worker.close(timeout=0)


@feature(T.EXIT)
def exit_(ls: LivekvServer, params):
    # pygls closes stdout after this: nothing may be written from now on (a completion still
    # decoding would reply into the closed pipe), and the worker stops at its next step.
    ls.protocol.gone = True
    if ls.worker is not None:
        ls.worker.close(timeout=0)


@feature(T.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: LivekvServer, params: T.DidChangeConfigurationParams):
    try:
        changes = parse_settings(params.settings)
    except ValueError as e:
        ls.report(f"livekv: settings refused ({e}); the old settings stay", show=True)
        return
    if not changes:
        return
    ls.interrupt_idle()
    ls.seal()
    fut = ls.require_worker().submit(ls.session.job_configure, changes)

    def done(f):
        if f.cancelled():
            return
        if f.exception() is not None:
            ls.report(f"livekv: settings refused ({error_message(f.exception())}); the old settings stay", show=True)
        else:
            ls.report(f"livekv: {f.result()}", T.MessageType.Info)
    fut.add_done_callback(lambda f: ls.later(done, f))
    ls.schedule_idle(None)  # a re-open or reload leaves documents to encode


# -- documents ---------------------------------------------------------------------------------
@feature(T.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: LivekvServer, params: T.DidOpenTextDocumentParams):
    doc = params.text_document
    ls.document_changed(doc.uri)
    ls.seal(doc.uri)
    on_progress, finish = work_done_progress(ls, doc.uri.rsplit("/", 1)[-1])
    # a later edit, or any request, may cut the first encode short: idle work finishes it
    ticket = ls.require_worker().ticket(doc.uri)
    ls.idle_jobs[ticket] = None
    fut = ls.submit_notification(f"didOpen {doc.uri}", ls.session.job_open, doc.uri, doc.text, doc.version,
                                 on_progress, ticket.should_stop, ticket=ticket)
    fut.add_done_callback(lambda f: finish())
    fut.add_done_callback(lambda f: ls.later(ls.idle_jobs.pop, ticket, None))
    ls.schedule_idle(doc.uri)


@feature(T.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: LivekvServer, params: T.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri)
    changes = []
    for ch in params.content_changes:
        r = getattr(ch, "range", None)
        rng = None if r is None else ((r.start.line, r.start.character), (r.end.line, r.end.character))
        changes.append((rng, ch.text))
    ls.submit_change(uri, params.text_document.version, changes)
    ls.schedule_idle(uri)  # encodes the edit unless the next keystroke or request comes first


@feature(T.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: LivekvServer, params: T.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri)
    ls.seal(uri)
    ls.refreshes.forget(uri)
    ls.submit_notification(f"didClose {uri}", ls.session.job_close, uri)
    ls.schedule_idle(None)  # the active file may import the closed one: it comes back from disk


# -- requests ----------------------------------------------------------------------------------
@on_arrival(T.TEXT_DOCUMENT_INLINE_COMPLETION)
def start_inline_completion(ls: LivekvServer, params: T.InlineCompletionParams):
    # a manual trigger may get several candidates (the `candidates` setting); typing gets one
    manual = params.context is not None and params.context.trigger_kind == T.InlineCompletionTriggerKind.Invoked
    return ls.submit_completion(params.text_document.uri, params.position, manual)


@on_arrival(T.TEXT_DOCUMENT_COMPLETION)
def start_completion(ls: LivekvServer, params: T.CompletionParams):
    return ls.submit_completion(params.text_document.uri, params.position, False)


@feature(T.TEXT_DOCUMENT_INLINE_COMPLETION, T.InlineCompletionOptions())
async def inline_completion(ls: LivekvServer, params: T.InlineCompletionParams):
    # InlineCompletionList has no isIncomplete: an answer cut short by maxPromptMs is empty
    answer = await ls.complete(ls.protocol.arrived_job())
    if answer is None or answer.incomplete:
        return T.InlineCompletionList(items=[])
    at = T.Position(line=params.position.line, character=answer.character)
    return T.InlineCompletionList(items=[T.InlineCompletionItem(insert_text=text, range=T.Range(at, at))
                                         for text in answer.texts])


@feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions())
async def completion(ls: LivekvServer, params: T.CompletionParams):
    # for clients without inline completion: one item, inserted as is at the cursor; always
    # isIncomplete, so the client asks again as the person types
    answer = await ls.complete(ls.protocol.arrived_job())
    if answer is None or not answer.texts:
        return T.CompletionList(is_incomplete=True, items=[])
    text, at = answer.texts[0], T.Position(line=params.position.line, character=answer.character)
    item = T.CompletionItem(label=text, kind=T.CompletionItemKind.Text, detail="livekv", insert_text=text,
                            text_edit=T.TextEdit(range=T.Range(at, at), new_text=text), sort_text="0")
    return T.CompletionList(is_incomplete=True, items=[item])


@on_arrival(STATS)
def start_stats(ls: LivekvServer, params):
    # not an interruption: stats wait behind idle work (so they also show its result)
    params = plain(params)
    params = params if isinstance(params, dict) else {}
    td = params.get("textDocument") if isinstance(params.get("textDocument"), dict) else params
    uri, version = td.get("uri"), td.get("version")
    if uri is None:
        return None  # the server's stats only: no job
    if not isinstance(uri, str) or not (version is None or isinstance(version, int)):
        raise JsonRpcInvalidParams(message=f"{STATS}: expected {{'textDocument': {{'uri': str, 'version'?: int}}}}, "
                                           f"got {params!r}")
    ls.seal(uri)
    return ls.require_worker().submit(ls.session.job_stats, uri, version)


def server_stats(ls: LivekvServer) -> dict:
    """The server's own stats (livekv/stats' `server`): read on the event loop, no job needed."""
    busy, session = ls.cancel_busy_ms, ls.session
    since = ls.worker.busy_since if ls.worker else None  # read once: the worker resets it
    return dict(position_encoding=session.encoding if session else None,
                settings=session.settings() if session else None,
                idle=dict(session.idle) if session else None, refresh=ls.refreshes.stats(),
                cancelled_completions=len(busy), cancel_busy_ms=list(busy),
                cancel_busy_ms_max=max(busy, default=None),
                worker_busy_ms=(time.perf_counter() - since) * 1e3 if since else 0.0)


@feature(STATS)
async def stats(ls: LivekvServer, params):
    fut = ls.protocol.arrived_job()
    if fut is None:
        return dict(server=server_stats(ls))
    try:
        doc = await asyncio.wrap_future(fut)
    except (ValueError, KeyError) as e:
        raise JsonRpcInvalidParams(message=error_message(e)) from None
    return dict(doc, server=server_stats(ls))
