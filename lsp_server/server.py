"""`livekv lsp`: the language server. Protocol only: LSP messages in, engine jobs out.

The event loop (pygls) never touches the model. Every engine call is a job on the one worker
thread (worker.py), queued the moment its message is read: notifications in their (synchronous)
handler, requests in an `on_arrival` hook, because pygls starts async handlers a loop turn
later. So jobs run in arrival order: no edit is lost or reordered, and a completion sees every
edit sent before it and none sent after. Request handlers (handlers.py) then await their job's future.

Cancellation: a completion's Ticket stops its decode at the next token step on $/cancelRequest
(the reply is RequestCancelled, -32800), on shutdown, or when its document changes (didChange,
didClose, didOpen bump its generation the moment they arrive). One abandoned because its document
changed returns an empty result (no items, isIncomplete): every client shows nothing and asks
again, whereas error replies make some clients (Neovim) print a message on every keystroke.

Idle work: after each edit and each completion the server queues one low-priority job
(LspSession.job_idle: prefetch the next line, encode what edits left dirty), which any edit, open,
close, settings change or completion request cancels the moment it arrives: it only runs while
the person waits for nothing (livekv/stats requests wait behind it). Once it leaves encoded a
document whose completion was answered empty, the server sends `livekv/refresh` (refresh.py).

Custom request `livekv/stats` ({"textDocument": {"uri", "version"?}} or {"uri"}): the engine's
stats for a document, its `workspace` (repoContext: every position group with its memory,
evictions; null when documents are alone), plus the server's own (how long cancelled completions
kept the worker busy, the idle work, refreshes); with no uri, the server's own, at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from lsprotocol import types as T
from pygls.exceptions import FeatureRequestError, JsonRpcInternalError, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from livekv import __version__
from livekv.incremental import Config

from .handlers import FEATURES
from .framing import Framer, read_messages, stdin_chunks
from .protocol import Protocol, describe, error_message, quiet_pygls, strict_converter
from .lsp_session import LspSession
from .options import LspOptions
from .refresh import Refreshes
from .session import Answer
from .worker import Batch, Ticket, Worker

log = logging.getLogger("livekv.lsp")


@dataclass
class CompletionJob:
    """A completion queued on the worker as its request arrived."""
    server: "LivekvServer"
    ticket: Ticket
    future: cf.Future
    epoch: int  # LivekvServer.epoch when it arrived

    def cancel(self) -> None:  # $/cancelRequest or shutdown: stop at the next token step
        self.server.cancel_completion(self.ticket)
        self.future.cancel()  # dropped if still queued


class LivekvServer(LanguageServer):
    """One client's server: the worker, the session, and the book-keeping of requests in flight.
    Methods run on the event loop unless they say otherwise."""

    def __init__(self, config: Config, options: LspOptions | None = None):
        super().__init__("livekv", __version__, protocol_cls=Protocol, converter_factory=strict_converter,
                         text_document_sync_kind=T.TextDocumentSyncKind.Incremental)
        self.base_config, self.base_options = config, options or LspOptions()
        self.worker: Worker | None = None
        self.session: LspSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutdown_requested = False
        self.inflight: dict[Ticket, float | None] = {}  # completion ticket -> when it was cancelled
        self.cancel_busy_ms: deque[float] = deque(maxlen=64)
        self.epoch = 0  # bumped by every message that interrupts idle work
        self.idle_jobs: dict[Ticket, cf.Future | None] = {}  # None: a didOpen's first encode
        self.changes: dict[str, Batch] = {}  # uri -> its queued change job, while it can take more
        self.refreshes = Refreshes(lambda *message: self.protocol.notify(*message))

    # -- transports: livekv's framing (framing.py) instead of pygls' reader --------------------
    def start_io(self, stdin=None, stdout=None) -> None:
        from pygls.io_ import StdoutWriter
        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))

        async def main():
            read = stdin_chunks(stdin or sys.stdin.buffer, asyncio.get_running_loop())
            await self._read(read)
        try:
            asyncio.run(main())
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()

    def start_tcp(self, host: str, port: int) -> None:
        self._stop_event = threading.Event()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            self.protocol.set_writer(writer)
            await self._read(lambda: reader.read(1 << 16))
            self.shutdown()

        async def main():
            self._server = await asyncio.start_server(connection, host, port)
            async with self._server:
                await self._server.serve_forever()
        try:
            asyncio.run(main())
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            pass

    async def _read(self, read) -> None:
        framer = Framer(self.base_options.max_message_bytes)
        await read_messages(read, framer, self.protocol.receive, lambda why: self.report(f"livekv: {why}"),
                            self._stop_event)

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
                self.report(f"{what}: {error_message(f.exception())}")
        fut.add_done_callback(lambda f: self.later(check, f))
        return fut

    def document_changed(self, uri: str) -> None:
        """A didChange/didClose/didOpen for uri arrived: abandon its running completion now."""
        self.interrupt_idle()
        self.require_worker().bump(uri)
        now = time.perf_counter()
        for t, cancelled in self.inflight.items():
            if t.uri == uri and cancelled is None:
                self.inflight[t] = now

    # -- edits: a storm of didChange becomes one engine edit ----------------------------------
    def submit_change(self, uri: str, version: int, changes: list) -> None:
        """Queue a didChange: into the change job already queued for uri when nothing for uri was
        queued after it (Batch), else as a new job."""
        batch = self.changes.get(uri)
        if batch is None or not batch.add((version, changes)):
            self.changes[uri] = batch = Batch((version, changes))
            self.submit_notification(f"didChange {uri}", self.session.job_changes, uri, batch)

    def seal(self, uri: str | None = None) -> None:
        """A job for uri (None: for every document) is being queued: later changes must come
        after it, in a new batch."""
        if uri is None:
            self.changes.clear()
        else:
            self.changes.pop(uri, None)

    # -- completions -------------------------------------------------------------------------
    def cancel_completion(self, ticket: Ticket) -> None:
        """Stop a completion at its next token step, noting when (for cancel_busy_ms)."""
        if self.inflight.get(ticket, 0) is None:
            self.inflight[ticket] = time.perf_counter()
        ticket.cancel()

    def submit_completion(self, uri: str, pos: T.Position, manual: bool) -> CompletionJob:
        self.interrupt_idle()
        self.seal(uri)
        # a newer request supersedes (empty answers): its own file's, and other files' past the cap
        live = [t for t, cancelled in self.inflight.items() if cancelled is None]  # oldest first
        others = [t for t in live if t.uri != uri]
        cap = self.session.options.max_queued if self.session else self.base_options.max_queued
        for t in [t for t in live if t.uri == uri] + others[: max(0, len(others) + 1 - cap)]:
            self.cancel_completion(t)
        worker = self.require_worker()
        ticket = worker.ticket(uri)
        self.inflight[ticket] = None
        fut = worker.submit(self.session.job_complete, uri, pos.line, pos.character, manual, ticket.should_stop,
                            ticket=ticket)
        fut.add_done_callback(lambda f: self.later(self._job_ended, ticket, time.perf_counter()))
        return CompletionJob(self, ticket, fut, self.epoch)

    async def complete(self, job: CompletionJob) -> Answer | None:
        """The answer of a submitted completion; None when abandoned. Queues the idle work
        (prefetch) before the handler replies, unless a newer message arrived meanwhile."""
        try:
            answer = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # $/cancelRequest, or shutdown
            job.cancel()
            raise
        except (ValueError, KeyError) as e:
            raise JsonRpcInvalidParams(message=error_message(e)) from None
        except RuntimeError as e:
            raise JsonRpcInternalError(message=str(e)) from None
        if answer is not None:
            self.refreshes.answered(job.ticket.uri, answer.incomplete)
            if job.epoch == self.epoch:
                self.schedule_idle(job.ticket.uri, prefetch=bool(answer.texts) and not answer.incomplete)
        return answer

    # -- idle work ---------------------------------------------------------------------------
    def interrupt_idle(self) -> None:
        """Something the person waits for arrived: stop the idle work at its next step or slice."""
        self.epoch += 1
        for ticket, fut in self.idle_jobs.items():
            ticket.cancel()
            if fut is not None:
                fut.cancel()  # dropped if still queued
        self.idle_jobs.clear()

    def schedule_idle(self, uri: str | None, prefetch: bool = False) -> None:
        worker = self.require_worker()
        ticket = worker.ticket()
        fut = worker.submit(self.session.job_idle, uri, prefetch, ticket.should_stop, ticket=ticket)
        self.idle_jobs[ticket] = fut

        def ended(f):
            self.idle_jobs.pop(ticket, None)
            if not f.cancelled() and f.exception() is not None:
                self.report(f"livekv: background work failed: {error_message(f.exception())}")
            elif not f.cancelled():
                self.refreshes.ready(f.result())  # the documents it left encoded
        fut.add_done_callback(lambda f: self.later(ended, f))

    def _job_ended(self, ticket: Ticket, end: float) -> None:
        cancelled = self.inflight.pop(ticket, None)
        if cancelled is not None and ticket.started_at is not None:
            # time the worker spent on this job after it was cancelled (or before it noticed)
            self.cancel_busy_ms.append(max(0.0, end - max(cancelled, ticket.started_at)) * 1e3)


def build_server(config: Config, options: LspOptions | None = None) -> LivekvServer:
    ls = LivekvServer(config, options)
    for name, options, f in FEATURES:
        ls.feature(name, options)(f)
    return ls


def run_server(config: Config, options: LspOptions) -> None:
    """Serve LSP over stdio (or TCP, options.tcp) until exit, then end the process: exit code
    0 after shutdown + exit, 1 when the client left without shutdown."""
    quiet_pygls()
    ls = build_server(config, options)
    try:
        if options.tcp:
            host, _, port = options.tcp.rpartition(":")
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
            ls.worker.close(timeout=2)  # a running decode stops at its next token step
    code = 0 if ls.shutdown_requested else 1
    # Leave without the interpreter's teardown: a worker still inside a kernel (or loading the
    # model) would meet torch's thread pools being destroyed under it ("terminate called
    # without an active exception"), and nothing is left to flush but the logs.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
