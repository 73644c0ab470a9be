"""One cursor, three ways in: `livekv lsp`, `livekv serve` (websocket) and `livekv complete`, each
its own real process, give the same completion. The cursor sits before an auto-closed `")`, so
the answer is only right when both bracket trims apply (the engine's stop policy does them for
every server now; the websocket server and `livekv complete` used to skip the second)."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

from websockets.asyncio.client import connect

from lsp_helpers import EXACT, expected_completion, inline, open_doc, server_env, stats
from test_lsp import start_server

TEXT = 'print("Hello, ")\n'
LINE, COL = 0, len('print("Hello, ')
FLAGS = ["--max-new-tokens", "8", *EXACT]


async def over_lsp() -> str:
    c, _ = await start_server()
    try:
        open_doc(c, "file:///hello.py", TEXT)
        await stats(c, "file:///hello.py")
        items = await inline(c, "file:///hello.py", LINE, COL)
        return items[0].insert_text if items else ""
    finally:
        await c.shutdown_session()
        await c.stop()


async def over_websocket() -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "livekv", "serve", "--port", "0", *FLAGS,
                                                env=server_env(), stderr=subprocess.PIPE)
    try:
        m = None
        while m is None:  # the server prints its address once it listens
            line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
            assert line, "the server exited before listening"
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
        async with connect(f"ws://127.0.0.1:{m[1]}/") as ws:
            await ws.send(json.dumps({"type": "open", "id": 1, "uri": "file:///hello.py", "text": TEXT}))
            assert json.loads(await ws.recv())["type"] == "ok"
            await ws.send(json.dumps({"type": "complete", "id": 2, "uri": "file:///hello.py", "line": LINE,
                                      "character": COL}))
            while (msg := json.loads(await asyncio.wait_for(ws.recv(), 300)))["type"] != "done":
                assert msg["type"] == "token", msg
            return msg["text"]
    finally:
        proc.terminate()
        await proc.wait()


def over_cli(tmp_path) -> str:
    path = tmp_path / "hello.py"
    path.write_text(TEXT)
    out = subprocess.run([sys.executable, "-m", "livekv", "complete", str(path), str(LINE), str(COL), *FLAGS],
                         env=server_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.removesuffix("\n")


async def test_the_same_cursor_gets_the_same_text_from_every_server(engine, tmp_path):
    want = expected_completion(engine, TEXT, LINE, COL, 8)
    assert want and not want.endswith('"'), want  # fitted: the line closes its string itself
    got = {"lsp": await over_lsp(), "websocket": await over_websocket(), "complete": over_cli(tmp_path)}
    assert got == {k: want for k in got}, got
