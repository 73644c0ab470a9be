"""One simulated editor of `livekv bench team`: a websocket client that types on its own file and
asks for a completion after each pause, as the browser demo does, timing each from the edit.

The typing is a replay of the file's own lines: a line's text (after its indentation) is
deleted, then typed back in bursts of 3 to 12 characters; each burst is one `edit`, and a
`complete` at the cursor follows it at once (the pause). The file is back to its own text after
each line, so the trace only depends on the file and the seed.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from websockets.asyncio.client import connect

HANG = 600  # seconds: a guard against a stuck server, not a performance bound


@dataclass
class Step:
    changes: list[dict]     # the edit's changes, in the protocol's form
    line: int               # the cursor after it (utf-16 columns: the lines replayed are ASCII)
    character: int
    complete: bool          # a pause: a completion follows the edit


def _change(line: int, a: int, b: int, text: str) -> dict:
    return {"range": {"start": {"line": line, "character": a}, "end": {"line": line, "character": b}},
            "text": text}


def typing(text: str, completions: int, seed: int) -> list[Step]:
    """Steps that retype lines of text (module docstring) until `completions` pauses."""
    rng = random.Random(seed)
    lines = text.split("\n")
    good = [i for i, ln in enumerate(lines) if i >= len(lines) // 5 and ln.isascii()
            and len(ln.strip()) >= 12 and not ln.strip().startswith(("#", '"', "'"))]
    if not good:
        raise ValueError("the file has no lines to retype (ASCII code lines of 12 characters or more, past its first "
                         "fifth): give the editors more of their files (--file-tokens)")
    steps: list[Step] = []
    pauses = 0
    while pauses < completions:
        i = rng.choice(good)
        ln = lines[i]
        indent = len(ln) - len(ln.lstrip())
        body = ln[indent:]
        steps.append(Step([_change(i, indent, len(ln), "")], i, indent, False))
        at = 0
        while at < len(body) and pauses < completions:
            burst = body[at: at + rng.randint(3, 12)]
            steps.append(Step([_change(i, indent + at, indent + at, burst)], i, indent + at + len(burst), True))
            at += len(burst)
            pauses += 1
        if at < len(body):  # the last pause came mid-line: put the line back
            steps.append(Step([_change(i, indent + at, indent + at, body[at:])], i, len(ln), False))
    return steps


class Client:
    """A protocol client: requests by id, each answered through its own queue."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0
        self.inbox: dict = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            self.inbox.setdefault(msg.get("id"), asyncio.Queue()).put_nowait((time.perf_counter(), msg))

    async def send(self, type_: str, **fields):
        self.n += 1
        self.inbox.setdefault(self.n, asyncio.Queue())
        await self.ws.send(json.dumps({"type": type_, "id": self.n, **fields}))
        return self.n

    async def next(self, id_) -> tuple[float, dict]:
        """(arrival time, message) of the next message for id_."""
        t, msg = await asyncio.wait_for(self.inbox[id_].get(), HANG)
        if msg["type"] == "error":
            raise RuntimeError(f"the server answered an error: {msg}")
        return t, msg

    async def call(self, type_: str, **fields) -> dict:
        return (await self.next(await self.send(type_, **fields)))[1]


async def editor(url: str, uri: str, text: str, steps: list[Step], ready: asyncio.Barrier,
                 contexts: dict[str, str], max_new: int) -> list[dict]:
    """Open the context files and the editor's own file, wait for every editor, then replay the
    steps. Returns one record per completion: edit -> first token and edit -> done, in ms."""
    async with connect(url, max_size=None, open_timeout=HANG) as ws:
        c = Client(ws)
        for cu, ct in contexts.items():
            await c.call("open", uri=cu, text=ct, role="context")
        await c.call("open", uri=uri, text=text, version=0)
        await ready.wait()
        out, version = [], 0
        for st in steps:
            version += 1
            t0 = time.perf_counter()
            ie = await c.send("edit", uri=uri, version=version, changes=st.changes)
            if not st.complete:
                await c.next(ie)
                continue
            ic = await c.send("complete", uri=uri, line=st.line, character=st.character, maxNewTokens=max_new)
            edited = (await c.next(ie))[1]["stats"]
            first = None
            while True:
                t, msg = await c.next(ic)
                if msg["type"] == "token" and first is None:
                    first = t
                if msg["type"] == "done":
                    break
            last = msg["stats"]["last_completion"]
            out.append(dict(first_ms=((first or t) - t0) * 1e3, line_ms=(t - t0) * 1e3, text=msg["text"],
                            empty=first is None, reused=bool(last.get("reused")), cancelled=msg["cancelled"],
                            rode=edited["tokens_encoded_last_edit"] == 0 < edited["dirty_tokens"]))
        c.reader.cancel()
        return out
