"""The websocket protocol's messages: parsing, validation and error codes.

Pure functions over JSON values, no sockets and no model, so every rule here can be read and
tested on its own. The wire format is described in docs/protocol.md. Columns on the wire are
UTF-16 code units (as in LSP and in browsers' JS strings); the session converts them (lines.py).
"""
from __future__ import annotations

import json
from typing import Any

from livekv.incremental.config import Config

PROTOCOL_VERSION = 1
# Under Ray Serve (`livekv serve --replicas N`), connections that send the same value of this
# header on the websocket upgrade go to the same replica (consistent hashing over the live ones).
WORKSPACE_HEADER = "X-Livekv-Workspace"

# error codes (docs/protocol.md lists them with their meaning)
BAD_JSON = "bad_json"
TOO_LARGE = "too_large"
UNKNOWN_TYPE = "unknown_type"
BAD_REQUEST = "bad_request"
UNKNOWN_URI = "unknown_uri"
BAD_RANGE = "bad_range"
BAD_VERSION = "bad_version"
UNAUTHORIZED = "unauthorized"
BUSY = "busy"
INTERNAL = "internal"

TYPES = ("hello", "open", "edit", "close", "complete", "cancel", "stats")
# an open's role: one of the connection's documents, or a context file its documents see (shared
# with every connection that has the same text as context)
ROLES = ("document", "context")


class ProtocolError(Exception):
    """A request the server refuses; becomes {"type": "error", "id", "code", "message"}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def error(id_: Any, code: str, message: str, **extra) -> dict:
    """An error reply; `extra` adds fields a client acts on (unknown_uri carries the `uri` to re-open)."""
    return {"type": "error", "id": id_, "code": code, "message": message, **extra}


def parse(raw: bytes | str, max_bytes: int) -> dict:
    """One incoming frame -> a message dict with a valid type and id. Raises ProtocolError; its
    `id` attribute carries the message id when it could be read, so the error can echo it."""
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        msg = ProtocolError(BAD_JSON, f"message is not valid JSON ({e}); send one JSON object per message")
    id_ = msg.get("id") if isinstance(msg, dict) else None
    id_ = id_ if isinstance(id_, (str, int)) and not isinstance(id_, bool) else None
    err = None
    # an oversized message is still read (up to the transport's hard limit), to echo its id
    if size > max_bytes:
        err = ProtocolError(TOO_LARGE, f"message of {size} bytes is over the limit of {max_bytes}; "
                                       "send smaller edits (changes with ranges) or raise --max-message-bytes")
    elif isinstance(msg, ProtocolError):
        err = msg
    elif not isinstance(msg, dict):
        err = ProtocolError(BAD_JSON, f"message is a JSON {type(msg).__name__}, expected an object "
                                      '{"type": ..., "id": ...}')
    elif id_ is None:
        err = ProtocolError(BAD_REQUEST, 'every message needs an "id" (a string or an integer), echoed by its reply')
    elif msg.get("type") not in TYPES:
        what = f"unknown message type {msg['type']!r}" if "type" in msg else 'the message has no "type"'
        err = ProtocolError(UNKNOWN_TYPE, f"{what}: expected one of {', '.join(TYPES)}")
    if err is not None:
        err.id = id_
        raise err
    return msg


def field(msg: dict, name: str, kind: type | tuple, default: Any = ..., at_least: int | None = None) -> Any:
    """msg[name], checked: ProtocolError(bad_request) naming the field when missing or wrong."""
    if name not in msg or msg[name] is None:
        if default is not ...:
            return default
        raise ProtocolError(BAD_REQUEST, f'"{msg.get("type")}" needs a field "{name}"')
    v = msg[name]
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(BAD_REQUEST, f'field "{name}" of "{msg.get("type")}" must be a {want}, '
                                         f"got {json.dumps(v)[:80]}")
    if at_least is not None and v < at_least:
        raise ProtocolError(BAD_REQUEST, f'field "{name}" of "{msg.get("type")}" must be at least {at_least}, got {v}')
    return v


def position(p: Any, where: str) -> tuple[int, int]:
    if not isinstance(p, dict):
        raise ProtocolError(BAD_REQUEST, f"{where} must be an object {{\"line\": int, \"character\": int}}")
    for k in ("line", "character"):
        v = p.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ProtocolError(BAD_REQUEST, f'{where}.{k} must be an integer >= 0, got {json.dumps(v)}')
    return p["line"], p["character"]


def changes(msg: dict) -> list[tuple[tuple[tuple[int, int], tuple[int, int]] | None, str]]:
    """The edit's changes as ((start, end) or None, text), positions in UTF-16 columns; a change
    without a range replaces the whole text."""
    items = field(msg, "changes", list)
    out = []
    for i, ch in enumerate(items):
        where = f"changes[{i}]"
        if not isinstance(ch, dict) or not isinstance(ch.get("text"), str):
            raise ProtocolError(BAD_REQUEST, f'{where} must be an object with a string "text" '
                                             'and an optional "range" {start, end}')
        r = ch.get("range")
        if r is None:
            out.append((None, ch["text"]))
            continue
        if not isinstance(r, dict):
            raise ProtocolError(BAD_REQUEST, f"{where}.range must be an object {{start, end}}")
        out.append(((position(r.get("start"), f"{where}.range.start"), position(r.get("end"), f"{where}.range.end")),
                    ch["text"]))
    return out


def options(msg: dict, *names: str) -> dict:
    """The engine settings a request may carry (maxNewTokens...), checked against the one
    schema the LSP settings use (Config): {field: value} of those present."""
    try:
        return Config.from_lsp({k: msg[k] for k in names if msg.get(k) is not None})
    except ValueError as e:
        raise ProtocolError(BAD_REQUEST, f'"{msg.get("type")}": {e}') from None
