"""The websocket protocol's messages: parsing, validation, error codes and column conversion.

Pure functions over JSON values and strings, no sockets and no model, so every rule here can be
read and tested on its own. The wire format is described in docs/protocol.md.

Columns on the wire are UTF-16 code units (as in LSP and in browsers' JS strings); the engine
counts code points. They differ only on lines holding characters outside the BMP (emoji...).
"""
from __future__ import annotations

import json
import re
from typing import Any

from livekv.incremental.lines import line_starts, to_offset

PROTOCOL_VERSION = 1
MAX_NEW_TOKENS_LIMIT = 256  # one completion may not hold the worker for longer than this

# error codes (docs/protocol.md lists them with their meaning)
BAD_JSON = "bad_json"
TOO_LARGE = "too_large"
UNKNOWN_TYPE = "unknown_type"
BAD_REQUEST = "bad_request"
UNKNOWN_URI = "unknown_uri"
BAD_RANGE = "bad_range"
BAD_VERSION = "bad_version"
UNAUTHORIZED = "unauthorized"
INTERNAL = "internal"

TYPES = ("hello", "open", "edit", "close", "complete", "cancel", "stats")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class ProtocolError(Exception):
    """A request the server refuses; becomes {"type": "error", "id", "code", "message"}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def error(id_: Any, code: str, message: str) -> dict:
    return {"type": "error", "id": id_, "code": code, "message": message}


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


def changes(msg: dict) -> list[tuple[tuple[int, int] | None, tuple[int, int] | None, str]]:
    """The edit's changes as (start, end, text) in UTF-16 columns; start=end=None replaces all."""
    items = field(msg, "changes", list)
    out = []
    for i, ch in enumerate(items):
        where = f"changes[{i}]"
        if not isinstance(ch, dict) or not isinstance(ch.get("text"), str):
            raise ProtocolError(BAD_REQUEST, f'{where} must be an object with a string "text" '
                                             'and an optional "range" {start, end}')
        r = ch.get("range")
        if r is None:
            out.append((None, None, ch["text"]))
            continue
        if not isinstance(r, dict):
            raise ProtocolError(BAD_REQUEST, f"{where}.range must be an object {{start, end}}")
        out.append((position(r.get("start"), f"{where}.range.start"), position(r.get("end"), f"{where}.range.end"),
                    ch["text"]))
    return out


# -- UTF-16 columns <-> code points ---------------------------------------------------------
def to_code_points(text: str, line: int, col16: int, starts=None) -> int:
    """The code-point column of UTF-16 column col16 on `line` of text. A line out of range is
    passed through for the engine to report; a column past the line or inside a surrogate pair
    raises ValueError in UTF-16 units, the client's."""
    starts = line_starts(text) if starts is None else starts
    if not 0 <= line < len(starts):
        return col16
    end = int(starts[line + 1]) if line + 1 < len(starts) else len(text)
    s = text[int(starts[line]): end].rstrip("\r\n")
    n16 = 0
    for i, ch in enumerate(s):
        if n16 == col16:
            return i
        n16 += 2 if ord(ch) > 0xFFFF else 1
        if n16 > col16:
            raise ValueError(f"character {col16} of line {line} falls inside a surrogate pair (UTF-16); "
                             "positions must be between characters")
    if n16 == col16:
        return len(s)
    raise ValueError(f"character {col16} is outside line {line} (it has {n16} UTF-16 code units)")


def column(text: str, line: int, col16: int) -> int:
    """to_code_points, skipping the scan when the text has no character outside the BMP."""
    return to_code_points(text, line, col16) if _ASTRAL.search(text) else col16


def resolve_changes(text: str, chs: list) -> tuple[str, Any]:
    """Protocol changes against the current text -> what to give the engine:

    ("batch", [((line, col), (line, col), text), ...]) in code points, for Document.edit_batch;
    or ("text", new_text) when some change has no range (replace all), for Document.set_text.
    Each change's positions refer to the text left by the changes before it (as in LSP).
    Raises ValueError for a position outside the text.
    """
    full = any(s is None for s, _, _ in chs)
    if not full and not _ASTRAL.search(text) and not any(_ASTRAL.search(t) for _, _, t in chs):
        return "batch", [(s, e, t) for s, e, t in chs]  # UTF-16 == code points: nothing to convert
    out, cur = [], text
    for i, (s, e, t) in enumerate(chs):
        if s is None:
            cur = t
            continue
        try:
            starts = line_starts(cur)
            s_cp = (s[0], to_code_points(cur, s[0], s[1], starts))
            e_cp = (e[0], to_code_points(cur, e[0], e[1], starts))
            a, b = to_offset(starts, cur, *s_cp), to_offset(starts, cur, *e_cp)
        except ValueError as err:
            raise ValueError(f"change {i + 1} of {len(chs)}: {err}") from None
        if b < a:
            raise ValueError(f"change {i + 1} of {len(chs)}: its range ends before it starts")
        out.append((s_cp, e_cp, t))
        cur = cur[:a] + t + cur[b:]
    return ("text", cur) if full else ("batch", out)
