"""`livekv lsp`: the language server. Protocol only: LSP messages in, engine jobs out.

The event loop (pygls) never touches the model. Every engine call is a job on the one worker
thread (worker.py), queued the moment its message is read: notifications in their (synchronous)
handler, requests in an `on_arrival` hook, because pygls starts async handlers a loop turn
later. So jobs run in arrival order: no edit is lost or reordered, and a completion sees every
edit sent before it and none sent after. Request handlers then await their job's future.

Cancellation: a completion's Ticket stops its decode at the next token step when the client
sends $/cancelRequest (the reply is RequestCancelled, -32800), when the server shuts down, or
when its document changes (didChange/didClose/didOpen bump the document's generation the moment
they arrive). A completion abandoned because its document changed returns an empty result
(no items, isIncomplete): every client shows nothing and asks again, whereas error replies make
some clients (Neovim) print a message on every keystroke.

Custom request `livekv/stats` ({"textDocument": {"uri", "version"?}} or {"uri"}): the engine's
stats for a document plus the server's own (how long cancelled completions kept the worker busy);
with no uri, the server's stats only, answered without waiting for the worker.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from lsprotocol import types as T
from pygls.exceptions import FeatureRequestError, JsonRpcInternalError, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from incremental import Config, Engine

from .protocol import Protocol, describe, on_arrival, plain, quiet_pygls, work_done_progress
from .session import Session, parse_settings
from .worker import Ticket, Worker

log = logging.getLogger("livekv.lsp")
STATS = "livekv/stats"
FEATURES: list[tuple[str, Any, Any]] = []  # (method, options, handler)


def feature(name: str, options: Any = None):
    """Collect a handler; build_server registers it (pygls cannot register bound methods)."""
    def deco(f):
        FEATURES.append((name, options, f))
        return f
    return deco


def _message(e: BaseException) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


@dataclass
class CompletionJob:
    """A completion queued on the worker as its request arrived."""
    server: "LivekvServer"
    ticket: Ticket
    future: cf.Future
    position: T.Position

    def cancel(self) -> None:  # $/cancelRequest or shutdown: stop at the next token step
        self.server.cancel_completion(self.ticket)
        self.future.cancel()  # dropped if still queued


class LivekvServer(LanguageServer):
    """One client's server: the worker, the session, and the book-keeping of requests in flight.
    Methods run on the event loop unless they say otherwise."""

    def __init__(self, config: Config):
        super().__init__("livekv", "0.1.0", protocol_cls=Protocol,
                         text_document_sync_kind=T.TextDocumentSyncKind.Incremental)
        self.base_config = config
        self.worker: Worker | None = None
        self.session: Session | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutdown_requested = False
        self.inflight: dict[Ticket, float | None] = {}  # completion ticket -> when it was cancelled
        self.cancel_busy_ms: deque[float] = deque(maxlen=64)

    # -- reporting (event loop only; from the worker use `later`) ----------------------------
    def report(self, message: str, level=T.MessageType.Error, show: bool = False) -> None:
        levels = {T.MessageType.Error: logging.ERROR, T.MessageType.Warning: logging.WARNING}
        log.log(levels.get(level, logging.INFO), "%s", message)
        self.window_log_message(T.LogMessageParams(type=level, message=message))
        if show:
            self.window_show_message(T.ShowMessageParams(type=level, message=message))

    def report_server_error(self, error, source) -> None:
        # a request's error already went back in its reply; anything else (a malformed message)
        # is logged, and the connection goes on
        if source is FeatureRequestError:
            log.info("request failed: %s", error)
        else:
            self.report(f"livekv: {describe(error)}")

    def later(self, fn, *args) -> None:
        """Run fn(*args) on the event loop; safe from any thread, a no-op once the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def require_worker(self) -> Worker:
        if self.worker is None:
            raise JsonRpcInternalError(message="the server is not initialized: send initialize first")
        return self.worker

    def submit_notification(self, what: str, fn, *args, ticket: Ticket | None = None):
        """Submit a job for a notification: there is no reply, so a failure is logged."""
        fut = self.require_worker().submit(fn, *args, ticket=ticket)

        def check(f):
            if not f.cancelled() and f.exception() is not None:
                self.report(f"{what}: {_message(f.exception())}")
        fut.add_done_callback(lambda f: self.later(check, f))
        return fut

    def document_changed(self, uri: str) -> None:
        """A didChange/didClose/didOpen for uri arrived: abandon its running completion now."""
        self.require_worker().bump(uri)
        now = time.perf_counter()
        for t, cancelled in self.inflight.items():
            if t.uri == uri and cancelled is None:
                self.inflight[t] = now

    # -- completions -------------------------------------------------------------------------
    def cancel_completion(self, ticket: Ticket) -> None:
        """Stop a completion at its next token step, noting when (for cancel_busy_ms)."""
        if self.inflight.get(ticket, 0) is None:
            self.inflight[ticket] = time.perf_counter()
        ticket.cancel()

    def submit_completion(self, uri: str, pos: T.Position) -> CompletionJob:
        worker = self.require_worker()
        ticket = worker.ticket(uri)
        self.inflight[ticket] = None
        fut = worker.submit(self.session.job_complete, uri, pos.line, pos.character, ticket.should_stop,
                            ticket=ticket)
        fut.add_done_callback(lambda f: self.later(self._job_ended, ticket, time.perf_counter()))
        return CompletionJob(self, ticket, fut, pos)

    async def complete(self, job: CompletionJob) -> tuple[str, T.Position] | None:
        """(text, cursor) of a submitted completion; None when abandoned or empty."""
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # $/cancelRequest, or shutdown
            job.cancel()
            raise
        except (ValueError, KeyError) as e:
            raise JsonRpcInvalidParams(message=_message(e)) from None
        except RuntimeError as e:
            raise JsonRpcInternalError(message=str(e)) from None
        if result is None or not result[0]:
            return None
        return result[0], T.Position(line=job.position.line, character=result[1])

    def _job_ended(self, ticket: Ticket, end: float) -> None:
        cancelled = self.inflight.pop(ticket, None)
        if cancelled is not None and ticket.started_at is not None:
            # time the worker spent on this job after it was cancelled (or before it noticed)
            self.cancel_busy_ms.append(max(0.0, end - max(cancelled, ticket.started_at)) * 1e3)

    def server_stats(self) -> dict:
        busy = self.cancel_busy_ms
        since = self.worker.busy_since if self.worker else None  # read once: the worker resets it
        return dict(position_encoding=self.session.encoding if self.session else None,
                    settings=asdict(self.session.config) if self.session else None,
                    cancelled_completions=len(busy), cancel_busy_ms=list(busy),
                    cancel_busy_ms_max=max(busy, default=None),
                    worker_busy_ms=(time.perf_counter() - since) * 1e3 if since else 0.0)


# -- lifecycle ---------------------------------------------------------------------------------
@feature(T.INITIALIZE)
def initialize(ls: LivekvServer, params: T.InitializeParams):
    ls.loop = asyncio.get_running_loop()
    config = ls.base_config
    try:
        config = config.updated(**parse_settings(params.initialization_options))
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

    ls.session = Session(config, encoding)
    ls.worker = ls.session.worker = Worker(load)  # loads the model on its thread, now
    log.info("initialized: position encoding %s, settings %s", encoding, asdict(config))


@feature(T.SHUTDOWN)
def shutdown(ls: LivekvServer, params):
    # Answer now: a running decode sees should_stop() at its next token step, queued jobs drop.
    ls.shutdown_requested = True
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
    fut = ls.require_worker().submit(ls.session.job_configure, changes)

    def done(f):
        if f.cancelled():
            return
        if f.exception() is not None:
            ls.report(f"livekv: settings refused ({_message(f.exception())}); the old settings stay", show=True)
        else:
            ls.report(f"livekv: {f.result()}", T.MessageType.Info)
    fut.add_done_callback(lambda f: ls.later(done, f))


# -- documents ---------------------------------------------------------------------------------
@feature(T.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: LivekvServer, params: T.DidOpenTextDocumentParams):
    doc = params.text_document
    ls.document_changed(doc.uri)
    on_progress, finish = work_done_progress(ls, doc.uri.rsplit("/", 1)[-1])
    ticket = ls.require_worker().ticket(doc.uri)  # a later edit may cut the warm-up short

    fut = ls.submit_notification(f"didOpen {doc.uri}", ls.session.job_open, doc.uri, doc.text, doc.version,
                                 on_progress, ticket.should_stop, ticket=ticket)
    fut.add_done_callback(lambda f: finish())


@feature(T.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: LivekvServer, params: T.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri)
    changes = []
    for ch in params.content_changes:
        r = getattr(ch, "range", None)
        rng = None if r is None else ((r.start.line, r.start.character), (r.end.line, r.end.character))
        changes.append((rng, ch.text))
    # the ticket goes stale at the next edit: this one's encoding is then left to that one
    ticket = ls.require_worker().ticket(uri)
    ls.submit_notification(f"didChange {uri}", ls.session.job_change, uri, params.text_document.version,
                           changes, ticket.should_stop, ticket=ticket)


@feature(T.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: LivekvServer, params: T.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.document_changed(uri)
    ls.submit_notification(f"didClose {uri}", ls.session.job_close, uri)


# -- requests ----------------------------------------------------------------------------------
@on_arrival(T.TEXT_DOCUMENT_INLINE_COMPLETION)
@on_arrival(T.TEXT_DOCUMENT_COMPLETION)
def start_completion(ls: LivekvServer, params):
    return ls.submit_completion(params.text_document.uri, params.position)


@feature(T.TEXT_DOCUMENT_INLINE_COMPLETION, T.InlineCompletionOptions())
async def inline_completion(ls: LivekvServer, params: T.InlineCompletionParams):
    got = await ls.complete(ls.protocol.arrived_job())
    if got is None:
        return T.InlineCompletionList(items=[])
    text, at = got
    return T.InlineCompletionList(items=[T.InlineCompletionItem(insert_text=text, range=T.Range(at, at))])


@feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions())
async def completion(ls: LivekvServer, params: T.CompletionParams):
    # for clients without inline completion: one item, inserted as is at the cursor
    got = await ls.complete(ls.protocol.arrived_job())
    if got is None:
        return T.CompletionList(is_incomplete=True, items=[])
    text, at = got
    item = T.CompletionItem(label=text, kind=T.CompletionItemKind.Text, detail="livekv", insert_text=text,
                            text_edit=T.TextEdit(range=T.Range(at, at), new_text=text), sort_text="0")
    return T.CompletionList(is_incomplete=True, items=[item])


@on_arrival(STATS)
def start_stats(ls: LivekvServer, params):
    params = plain(params)
    params = params if isinstance(params, dict) else {}
    td = params.get("textDocument") if isinstance(params.get("textDocument"), dict) else params
    uri, version = td.get("uri"), td.get("version")
    if uri is None:
        return None  # the server's stats only: no job
    if not isinstance(uri, str) or not (version is None or isinstance(version, int)):
        raise JsonRpcInvalidParams(message=f"{STATS}: expected {{'textDocument': {{'uri': str, 'version'?: int}}}}, "
                                           f"got {params!r}")
    return ls.require_worker().submit(ls.session.job_stats, uri, version)


@feature(STATS)
async def stats(ls: LivekvServer, params):
    fut = ls.protocol.arrived_job()
    if fut is None:
        return dict(server=ls.server_stats())
    try:
        doc = await asyncio.wrap_future(fut)
    except (ValueError, KeyError) as e:
        raise JsonRpcInvalidParams(message=_message(e)) from None
    return dict(doc, server=ls.server_stats())


def build_server(config: Config) -> LivekvServer:
    ls = LivekvServer(config)
    for name, options, f in FEATURES:
        ls.feature(name, options)(f)
    return ls


def run_server(config: Config, tcp: str | None = None) -> int:
    """Serve LSP over stdio (or tcp "HOST:PORT") until exit. Returns the process exit code:
    0 after shutdown + exit, 1 when the client left without shutdown."""
    quiet_pygls()
    ls = build_server(config)
    try:
        if tcp:
            host, _, port = tcp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--tcp wants HOST:PORT, e.g. 127.0.0.1:2087, got {tcp!r}")
            ls.start_tcp(host, int(port))
        else:
            # stdout carries LSP: move anything else that writes there (print, C libraries) to stderr
            lsp_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            sys.stdout = sys.stderr
            ls.start_io(sys.stdin.buffer, lsp_out)
    except SystemExit:
        pass
    finally:
        if ls.worker is not None:
            ls.worker.close(timeout=5)
    return 0 if ls.shutdown_requested else 1
