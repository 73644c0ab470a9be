"""LSP's base protocol framing (`Content-Length: N\\r\\n\\r\\n` + N bytes of JSON), read so that no
byte sequence can deafen the server.

pygls' reader waits forever on a header block without a usable Content-Length, reads a body
of whatever length it is told, and allocates it. Here a `Framer` turns a byte stream into
messages and problems, and never stalls on one message:

- a header block without Content-Length, or with a non-numeric one: the problem is reported
  and the stream resynchronises at the next `Content-Length:` header;
- a length over `max_bytes`: refused unread; the bytes are discarded, unbuffered, up to the next
  header (a client that really sends 1 TB costs a scan, not an allocation);
- a declared length longer than the JSON (a body "10 bytes short"): the JSON value that ends
  early is taken, and the bytes after it go back to the stream, where they start the next
  header; when the client sends nothing more, `flush()` (called after a quiet spell) does the
  same with what has arrived;
- a body that is not JSON (or a declared length shorter than the JSON): reported, and the
  stream is scanned from the body's second byte for the next header, since a wrong length may
  have run into the next message.

`feed(data)` returns `(kind, payload)` pairs: ("message", parsed JSON) or ("problem", text).
"""
from __future__ import annotations

import json
import re

HEADER = re.compile(rb"content-length[ \t]*:", re.I)
LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*([^\r\n]*)\r?\n", re.I)
END = re.compile(rb"\r?\n\r?\n")
KEEP = len(b"Content-Length:")  # bytes kept when discarding: a header may straddle two reads
MAX_HEADER = 8192               # a header block longer than this is garbage


class Framer:
    """Bytes in, JSON messages and one-line problems out. One per connection."""

    def __init__(self, max_bytes: int):
        assert max_bytes > 0
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.need: int | None = None   # the body length the current header block declared
        self.discarding = False       # skipping to the next header (after a refused or bad header)

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        self.buf += data
        out: list[tuple[str, object]] = []
        while self._step(out):
            pass
        return out

    def flush(self) -> list[tuple[str, object]]:
        """The stream went quiet: a body still short of its declared length is taken if it
        already holds a whole JSON value (the client sent fewer bytes than it said)."""
        out: list[tuple[str, object]] = []
        if self.need is not None and self.buf:
            value, end = _leading_json(bytes(self.buf))
            if value is not None:
                out.append(("problem", f"Content-Length said {self.need} bytes but only {end} came; "
                                       "took the JSON that came"))
                out.append(("message", value))
                del self.buf[:end]
                self.need = None
                while self._step(out):
                    pass
        return out

    # -- one state transition; False when more bytes are needed -------------------------------
    def _step(self, out: list) -> bool:
        if self.discarding:
            return self._skip_to_header()
        if self.need is None:
            return self._header(out)
        if len(self.buf) < self.need:
            return False
        body, self.need = bytes(self.buf[: self.need]), None
        del self.buf[: len(body)]
        self._body(body, out)
        return True

    def _skip_to_header(self) -> bool:
        m = HEADER.search(self.buf)
        if m is None:
            del self.buf[: max(0, len(self.buf) - KEEP)]
            return False
        del self.buf[: m.start()]
        self.discarding = False
        return True

    def _header(self, out: list) -> bool:
        m = HEADER.search(self.buf)
        if m is None:
            if self.buf.strip():
                if len(self.buf) > MAX_HEADER or END.search(self.buf):
                    out.append(("problem", f"a header block without Content-Length: {_show(self.buf)}; "
                                           "skipped to the next Content-Length header"))
                    self.discarding = True
                    return True
            else:
                self.buf.clear()
            return False
        if m.start() > 0:
            junk = bytes(self.buf[: m.start()])
            if junk.strip():
                out.append(("problem", f"skipped {len(junk)} bytes that were not a message: {_show(junk)}"))
            del self.buf[: m.start()]
        end = END.search(self.buf)
        if end is None:
            if len(self.buf) > MAX_HEADER:
                out.append(("problem", "a header block over 8 KiB: skipped to the next Content-Length header"))
                del self.buf[:KEEP]
                self.discarding = True
                return True
            return False
        block = bytes(self.buf[: end.end()])
        value = LENGTH.match(block)
        raw = value[1].strip() if value else b""
        if not raw.isdigit():
            out.append(("problem", f"Content-Length {_show(raw)} is not a number of bytes; "
                                   "skipped to the next Content-Length header"))
            del self.buf[:1]  # a header may start inside this one (a cut write, then a whole message)
            self.discarding = True
            return True
        del self.buf[: end.end()]
        n = int(raw)
        if n > self.max_bytes:
            out.append(("problem", f"a message of {n:,} bytes is over the {self.max_bytes:,}-byte cap "
                                   "(setting maxMessageBytes): refused unread, skipped to the next header"))
            self.discarding = True
            return True
        self.need = n
        return True

    def _body(self, body: bytes, out: list) -> None:
        try:
            out.append(("message", json.loads(body)))
            return
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        value, end = _leading_json(body)
        rest = body[end:].lstrip()
        if value is not None and (HEADER.match(rest) or b"content-length:".startswith(rest.lower())):
            out.append(("problem", f"Content-Length said {len(body)} bytes but the JSON ended at {end}; "
                                   "took it, and read on from there"))
            out.append(("message", value))
            self.buf[:0] = body[end:]
            return
        out.append(("problem", f"a {len(body)}-byte body that is not JSON: {_show(body)}; "
                               "skipped to the next Content-Length header"))
        # the declared length may have run into the next message: look for its header in the body too
        self.buf[:0] = body[1:]
        self.discarding = True


def _leading_json(data: bytes) -> tuple[object | None, int]:
    """(the JSON value data starts with, the byte offset where it ends), or (None, 0)."""
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        text = data[: e.start].decode("utf-8")
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None, 0
    return value, len(text[: len(text) - len(stripped) + end].encode("utf-8"))


def _show(data: bytes, n: int = 60) -> str:
    s = bytes(data[:n]).decode("utf-8", errors="replace")
    return repr(s + ("…" if len(data) > n else ""))


def frame(message: dict | list | str | bytes) -> bytes:
    """A message with its header, as a client sends it (str/bytes: a body as is)."""
    body = message if isinstance(message, bytes) else (
        message.encode() if isinstance(message, str) else json.dumps(message).encode())
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def read_messages(read, framer: Framer, on_message, on_problem, stop, quiet: float = 0.5) -> None:
    """Feed `await read()` chunks (b"" at the end of the stream) through framer until the end or
    stop.is_set(); on_message(value) / on_problem(text) for what comes out. A body still short
    of its declared length after `quiet` seconds without bytes is flushed (Framer.flush)."""
    import asyncio
    pending = None
    while not stop.is_set():
        if pending is None:
            pending = asyncio.ensure_future(read())
        done, _ = await asyncio.wait({pending}, timeout=quiet if framer.need is not None else None)
        if done:
            data, pending = pending.result(), None
            if not data:
                return
            items = framer.feed(data)
        else:
            items = framer.flush()
        for kind, payload in items:
            (on_message if kind == "message" else on_problem)(payload)


def stdin_chunks(stream, loop):
    """`read` for read_messages over a blocking binary stream (stdin): a thread reads chunks as
    they come, so a slow or silent client never blocks the event loop."""
    import asyncio
    import os
    import threading
    q: asyncio.Queue = asyncio.Queue()

    def pump():
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(q.put_nowait, data)
            except RuntimeError:  # the loop is gone
                return
            if not data:
                return
    threading.Thread(target=pump, name="livekv-stdin", daemon=True).start()
    return q.get
