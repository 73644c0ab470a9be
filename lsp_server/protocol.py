"""The JSON-RPC/LSP plumbing livekv adds to pygls: arrival order, malformed messages, logs,
and work done progress.

- Arrival order: pygls starts an async request handler from a later turn of the event loop, and
  a transport with buffered input (TCP) may deliver the next didChange before that turn. A
  request's `on_arrival` start queues its job as the request is read, so the worker's order is
  the arrival order on every transport; the handler then awaits `arrived_job()`.
- Malformed messages: pygls' read loop survives garbage (bad JSON, a wrong header, a body that
  is not JSON-RPC) but does not answer a request whose params do not deserialize (the client
  would wait forever), and logs a traceback for each. Here such requests get InvalidParams and
  stderr gets one line per problem.
- Settings: LSP setting names (camelCase, under "livekv") -> Config fields and the server's own
  (LspOptions, options.py).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any, Callable

from lsprotocol import types as T
from pygls.exceptions import (JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest,
                              JsonRpcRequestCancelled)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from livekv.incremental.config import Config

from .options import LspOptions, lsp_setting_names


log = logging.getLogger("livekv.lsp")

ARRIVAL: dict[str, Callable] = {}  # method -> start(server, params), run as the request is read
_tokens = itertools.count(1)


def on_arrival(method: str):
    """Register start(server, params) -> job: run the moment a `method` request is read."""
    def deco(f):
        ARRIVAL[method] = f
        return f
    return deco


class Protocol(LanguageServerProtocol):
    """pygls' protocol, plus arrival-time jobs, minus its own copy of every document (the
    engine holds the text), and answering requests whose params do not even deserialize."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrived: dict[Any, Any] = {}  # request id -> its start's job (or the exception it raised)
        self.gone = False  # the client's end is closed (or exit came): nothing more is written

    # -- receiving (framing.py hands over each message's parsed JSON) ------------------------
    def receive(self, value: Any) -> None:
        """One parsed JSON message from the client: checked as JSON-RPC 2.0 says (an error reply
        for a batch, a message without "jsonrpc": "2.0", a request with id null, or any request
        after shutdown but exit), then handled as pygls does."""
        def refuse(msg_id, why: str) -> None:
            log.warning("refused a message: %s", why)
            error = JsonRpcInvalidRequest(message=why).to_response_error()
            # a dict, not pygls' message class: its serializer drops "id": null, which JSON-RPC requires
            self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": error.code, "message": why}})
        if isinstance(value, list):
            return refuse(None, "a JSON-RPC batch (an array): send one message at a time")
        if not isinstance(value, dict):
            return refuse(None, f"a message must be a JSON object, got {type(value).__name__}")
        msg_id = value.get("id")
        msg_id = msg_id if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool) else None
        if value.get("jsonrpc") != "2.0":
            if "id" in value:
                return refuse(msg_id, 'the message lacks "jsonrpc": "2.0"')
            log.warning('ignored a notification without "jsonrpc": "2.0": %s', str(value)[:120])
            return
        method = value.get("method")
        if method is not None and "id" in value and msg_id is None:
            return refuse(None, f"{method}: a request's id must be an integer or a string, got {value['id']!r}")
        if method is not None and msg_id is not None and self._shutdown and method != T.EXIT:
            return refuse(msg_id, f"{method}: the server is shut down; only exit is accepted")
        try:
            message = _structure(value, self.structure_message)
            self.handle_message(message)
        except Exception as e:
            self._server._report_server_error(e, JsonRpcException)

    def _send_data(self, data):
        if self.gone:
            return
        try:
            super()._send_data(data)
        except (BrokenPipeError, ConnectionResetError):
            self.client_gone()

    def client_gone(self) -> None:
        """The client's end of the pipe closed: say so once, and stop reading."""
        if not self.gone:
            self.gone = True
            log.warning("the client closed the connection; stopping")
            self._server.shutdown()

    def _handle_request(self, msg_id, method_name, params):
        if (start := ARRIVAL.get(method_name)) is not None:
            try:
                self.arrived[msg_id] = start(self._server, params)
            except Exception as e:  # raised again by the handler: the request's reply
                self.arrived[msg_id] = e
        super()._handle_request(msg_id, method_name, params)

    def arrived_job(self):
        """In a handler: the job its on_arrival start queued (raises what the start raised)."""
        job = self.arrived.pop(self.msg_id)
        if isinstance(job, Exception):
            raise job
        return job

    def _handle_cancel_notification(self, msg_id):
        # a handler that has not started never will (pygls cancels its task): stop its job here;
        # a started one sees CancelledError instead
        job = self.arrived.pop(msg_id, None)
        if job is not None and hasattr(job, "cancel"):
            job.cancel()
        super()._handle_cancel_notification(msg_id)

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except JsonRpcException as e:
            if "method" in data and isinstance(data.get("id"), (int, str)):
                detail = "; ".join(error_lines(e.__cause__)) if e.__cause__ is not None else str(e)
                err = JsonRpcInvalidParams(message=f"{data['method']}: malformed params: {detail}")
                self._send_response(data["id"], error=err.to_response_error())
            raise  # pygls' read loop logs it (report_server_error) and goes on

    # the document notifications go straight to livekv's handlers (no pygls Workspace update)
    @lsp_method(T.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params):
        yield self.fm.features[T.TEXT_DOCUMENT_DID_OPEN], (params,), None

    @lsp_method(T.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params):
        yield self.fm.features[T.TEXT_DOCUMENT_DID_CHANGE], (params,), None

    @lsp_method(T.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params):
        yield self.fm.features[T.TEXT_DOCUMENT_DID_CLOSE], (params,), None


def _structure(x: Any, hook: Callable) -> Any:
    """json.loads(..., object_hook=hook) on an already parsed value: every object, innermost first."""
    if isinstance(x, dict):
        return hook({k: _structure(v, hook) for k, v in x.items()})
    if isinstance(x, list):
        return [_structure(v, hook) for v in x]
    return x


def strict_converter():
    """lsprotocol's converter, minus its coercions: a field typed int that holds "0" or 0.5, or
    a str field that holds 5, is an error (InvalidParams), not a value silently changed."""
    from pygls.protocol import default_converter
    c = default_converter()

    def strict(kind: type, ok: Callable[[Any], bool]) -> None:
        def hook(v, _):
            if not ok(v):
                raise TypeError(f"expected {kind.__name__}, got {v!r}")
            return v
        c.register_structure_hook(kind, hook)
    strict(int, lambda v: isinstance(v, int) and not isinstance(v, bool))
    strict(float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    strict(str, lambda v: isinstance(v, str))
    strict(bool, lambda v: isinstance(v, bool))
    return c


def parse_settings(settings: Any) -> dict:
    """Field changes named by LSP settings: `{"livekv": {...}}` or the same keys at top level.

    Under "livekv" an unknown key is an error; at top level other keys belong to other tools and
    are ignored. ValueError says what was wrong (the schema: options.py)."""
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
    known = lsp_setting_names()
    unknown = sorted(set(section) - set(known))
    if scoped and unknown:
        raise ValueError(f"unknown livekv setting(s) {unknown}: known are {known}")
    return {**Config.from_lsp(section), **LspOptions.from_lsp(section)}


def json_safe(x: Any) -> Any:
    """numpy scalars and tuples in engine stats -> plain JSON values."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    return x


def error_message(e: BaseException) -> str:
    """An exception's message for a client: KeyError's str() would add quotes."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def error_lines(exc: BaseException) -> list[str]:
    """cattrs' validation errors as 'expected int @ $.params.position.line' lines."""
    try:
        import cattrs
        return cattrs.transform_error(exc)
    except Exception:
        return [str(exc)]


def describe(error: BaseException) -> str:
    """One line for a message pygls could not handle."""
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"ignored a message that is not JSON ({error})"
    if isinstance(error, AttributeError) and "jsonrpc" in str(error):
        return "ignored a message that is not a JSON-RPC object"
    if isinstance(error, JsonRpcException) and error.__cause__ is not None:
        return f"ignored a message with malformed params: {'; '.join(error_lines(error.__cause__))}"
    return str(error)


def plain(x: Any) -> Any:
    """pygls hands custom requests' params over as namedtuples: back to dicts."""
    if hasattr(x, "_asdict"):
        return {k: plain(v) for k, v in x._asdict().items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


class _ExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # SystemExit: pygls ends the TCP server by raising it inside the connection's task
        if isinstance(exc, (JsonRpcInvalidParams, JsonRpcRequestCancelled, SystemExit)):
            return False
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):  # Protocol.client_gone says it once
            return False
        return not str(record.msg).startswith(("Unable to handle message", "Unable to deserialize message"))


def quiet_pygls() -> None:
    """pygls logs every message body at INFO and a traceback per error reply or bad message;
    keep stderr for livekv's own one-line logs (DEBUG still shows pygls' detail)."""
    root = logging.getLogger().level
    logging.getLogger("pygls").setLevel(max(logging.WARNING, root))
    if root > logging.DEBUG:
        for name in ("pygls.protocol.json_rpc", "pygls.server", "asyncio"):
            logging.getLogger(name).addFilter(_ExpectedErrors())


def work_done_progress(server, title: str):
    """(on_progress(done, total), finish()) for a server-initiated $/progress, both callable from
    any thread; on_progress is None when the client cannot show work done progress."""
    caps = server.client_capabilities.window
    if not (caps and caps.work_done_progress):
        return None, lambda: None
    token = f"livekv/encode/{next(_tokens)}"
    q: asyncio.Queue = asyncio.Queue()
    wp = server.work_done_progress

    async def pump():
        try:
            await asyncio.wait_for(wp.create_async(token), 10)
        except Exception as e:
            log.warning("the client refused progress token %s: %s", token, e)
            return
        wp.begin(token, T.WorkDoneProgressBegin(title="livekv: encoding", message=title, percentage=0))
        last = "ready"
        while (item := await q.get()) is not None:
            done, total = item
            last = f"{done}/{total} tokens"
            wp.report(token, T.WorkDoneProgressReport(message=last, percentage=min(100, 100 * done // max(total, 1))))
        # an edit arriving during the warm-up takes over the rest of the encoding
        wp.end(token, T.WorkDoneProgressEnd(message=f"{title}: {last}"))

    server.loop.create_task(pump())
    return (lambda done, total: server.later(q.put_nowait, (done, total))), (lambda: server.later(q.put_nowait, None))
