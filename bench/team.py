"""Many editors on one `livekv serve`: batched decode against the serial server, in one run.

    livekv bench team [--editors 1,2,4,8,16] [--completions 10] [--file-tokens 600]
                      [--context-files 3] [--context-tokens 800] [--max-new-tokens 16]
                      [--threads 1] [--precision auto] [--batched-args FLAGS] [--out bench/out/team]

Starts two `livekv serve` processes on this machine: one batched (--batch-decode: every
connection's passes in one forward per step), one serial (--no-batch-decode: one job at a time,
connections taking turns, as before). For each number of editors it runs the same load on each,
in alternating order: every editor is a websocket client (bench/team_editor.py) that opens the
shared context files (`open` with role context) and its own stdlib module, then retypes lines of
it in bursts, asking for a completion after each burst. First, as the lone baseline, each
editor's trace runs with nobody else on the server. Reports, per server and number of editors:
completions per second over the run, p50/p95 of edit -> first token and of edit -> the whole
line (done), the ratio of batched to serial and of first token to the same editors alone, the
batch's passes per step, the cache tokens the server holds (shared ones once), and the load
average. Writes team.json, team.md and team.png to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from livekv.bench.metrics import percentile
from livekv.bench.runner import LoadMeter
from livekv.bench.team_editor import HANG, Client, editor, typing

from .edit_cost import real_file
from .memory import stdlib_files

SERVERS = ("serial", "batched")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """A `livekv serve` process; ready once its model answers a completion."""

    def __init__(self, batched: bool, a: argparse.Namespace, log: Path):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "-m", "livekv", "--log-level", "WARNING", "serve", "--port", str(self.port),
               "--threads", str(a.threads),
               "--precision", a.precision, "--max-new-tokens", str(a.max_new_tokens),
               "--batch-decode" if batched else "--no-batch-decode"]
        if batched:
            cmd += a.batched_args.split()
        if a.model:
            cmd += ["--model", a.model]
        self.cmd = cmd
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=self.log)

    async def ready(self) -> None:
        from websockets.asyncio.client import connect
        deadline = time.monotonic() + HANG
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekv serve exited with code {self.proc.returncode} before it was ready "
                                   f"(its log: {self.log.name})")
            try:
                async with connect(self.url, open_timeout=5) as ws:
                    c = Client(ws)
                    await c.call("open", uri="file:///warmup.py", text="def f(x):\n    return x + 1\n")
                    await c.call("complete", uri="file:///warmup.py", line=1, character=4)
                    c.reader.cancel()
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def workspace_stats(url: str) -> dict:
    """The server's cache counts (shared and private tokens), from a connection of its own."""
    from websockets.asyncio.client import connect
    async with connect(url, open_timeout=HANG) as ws:
        c = Client(ws)
        await c.call("open", uri="file:///probe.py", text="x = 1\n")
        st = (await c.call("stats", uri="file:///probe.py"))["stats"]
        c.reader.cancel()
        ws = st.get("workspace") or {}
        return dict(ws.get("server") or {}, batch=ws.get("batch"))


async def phase(url: str, files: list[tuple[str, str]], contexts: dict[str, str], a: argparse.Namespace,
                first: int = 0) -> dict:
    """n editors at once on one server (editor i replays trace first + i); their records and the
    run's wall time."""
    ready = asyncio.Barrier(len(files) + 1)
    tasks = [asyncio.create_task(editor(url, uri, text, typing(text, a.completions, seed=first + i), ready, contexts,
                                        a.max_new_tokens)) for i, (uri, text) in enumerate(files)]
    await ready.wait()
    t0 = time.perf_counter()
    cache = asyncio.create_task(workspace_stats(url))  # while every editor holds its files
    records = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cache, after = await cache, (await workspace_stats(url))["batch"]
    before = cache["batch"]
    steps = after["steps"] - before["steps"]
    width = (after["passes"] - before["passes"]) / steps if steps else None  # the serial server runs none
    return dict(wall_s=wall, records=[r for rs in records for r in rs], cache=cache, passes_per_step=width,
                ahead_steps=after["ahead"] - before["ahead"])


def summarise(server: str, n: int, run: dict, load: LoadMeter, lone: list[list[dict]]) -> dict:
    """One phase's figures; lone[i]: editor i's records when it ran alone (on the batched server)."""
    rs = run["records"]
    first, line = [r["first_ms"] for r in rs], [r["line_ms"] for r in rs]
    alone = [r["first_ms"] for rs_i in lone[:n] for r in rs_i]
    return dict(server=server, editors=n, completions=len(rs), wall_s=run["wall_s"], lone_first_p50=percentile(alone, 50),
                throughput=len(rs) / run["wall_s"], first_p50=percentile(first, 50), first_p95=percentile(first, 95),
                line_p50=percentile(line, 50), line_p95=percentile(line, 95),
                reused=sum(r["reused"] for r in rs), empty=sum(r["empty"] for r in rs), rode=sum(r["rode"] for r in rs),
                cancelled=sum(r["cancelled"] for r in rs), load=load.summary(), cache=run["cache"],
                passes_per_step=run["passes_per_step"], ahead_steps=run["ahead_steps"])


def table(rows: list[dict]) -> str:
    by = {(r["server"], r["editors"]): r for r in rows}
    out = ["| editors | server | completions/s | x serial | first token p50 / p95 ms | x lone p50 | "
           "whole line p50 / p95 ms | passes/step | reused | cache tokens (shared) | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = by.get(("serial", r["editors"]))
        x = f"{r['throughput'] / s['throughput']:.2f}" if s and r["server"] == "batched" else ""
        xl = f"{r['first_p50'] / r['lone_first_p50']:.2f}" if r["server"] == "batched" else ""
        c = r["cache"]
        w = f"{r['passes_per_step']:.1f}" if r["passes_per_step"] else ""
        out.append(f"| {r['editors']} | {r['server']} | {r['throughput']:.2f} | {x} | {r['first_p50']:.0f} / "
                   f"{r['first_p95']:.0f} | {xl} | {r['line_p50']:.0f} / {r['line_p95']:.0f} | {w} | "
                   f"{r['reused']}/{r['completions']} | {c.get('tokens', '?')} ({c.get('shared_tokens', '?')}) | "
                   f"{r['load']['mean']:.1f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("throughput", None, "completions per second"), ("first_p50", "first_p95", "edit -> first token, ms"),
              ("line_p50", "line_p95", "edit -> whole line, ms")]
    for ax, (k50, k95, title) in zip(axes, panels):
        for server, color in (("serial", "tab:gray"), ("batched", "tab:green")):
            rs = sorted((r for r in rows if r["server"] == server), key=lambda r: r["editors"])
            xs = [r["editors"] for r in rs]
            ax.plot(xs, [r[k50] for r in rs], "o-", color=color, label=f"{server}" + (" p50" if k95 else ""))
            if k95:
                ax.plot(xs, [r[k95] for r in rs], "o--", color=color, alpha=0.6, label=f"{server} p95")
            if k50 == "first_p50" and server == "batched":
                ax.plot(xs, [r["lone_first_p50"] for r in rs], "k:", label="each editor alone, p50")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("editors")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inputs(a: argparse.Namespace, tokenizer) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(each editor's (uri, text), the context files), all from the stdlib's largest modules."""
    need = max(a.editors) + a.context_files
    paths = stdlib_files(need)
    ctx = {f"file://{p}": real_file(str(p), a.context_tokens, tokenizer)[1] for p in paths[: a.context_files]}
    own = [(f"file://{p}", real_file(str(p), a.file_tokens, tokenizer)[1]) for p in paths[a.context_files:]]
    return own, ctx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench team", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editors", default="1,2,4,8,16", help="numbers of editors to run, comma-separated")
    p.add_argument("--completions", type=int, default=10, help="completions each editor asks for")
    p.add_argument("--file-tokens", type=int, default=600, help="each editor's file, cut to about this many tokens")
    p.add_argument("--context-files", type=int, default=3, help="context files every editor shares")
    p.add_argument("--context-tokens", type=int, default=800, help="each context file cut to about this")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--precision", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--batched-args", default="", metavar="FLAGS",
                   help="more `livekv serve` flags for the batched server, e.g. --batched-args=--first-passes-first")
    p.add_argument("--out", default="bench/out/team")
    a = p.parse_args(argv)
    a.editors = [int(x) for x in a.editors.split(",")]
    from livekv.incremental import Config
    from livekv.incremental.models import load_tokenizer
    own, ctx = inputs(a, load_tokenizer(a.model, Config(model=a.model).cache_path))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = {name: Serve(name == "batched", a, out / f"serve-{name}.log") for name in SERVERS}
    rows = []
    try:
        for s in servers.values():
            asyncio.run(s.ready())
        # the lone baseline: every editor's own trace with nobody else on the server
        lone = [asyncio.run(phase(servers["batched"].url, [own[i]], ctx, a, first=i))["records"]
                for i in range(max(a.editors))]
        for i, n in enumerate(a.editors):
            order = SERVERS if i % 2 == 0 else SERVERS[::-1]
            for name in order:
                load = LoadMeter()
                run = asyncio.run(phase(servers[name].url, own[:n], ctx, a))
                load.sample()
                rows.append(summarise(name, n, run, load, lone))
                r = rows[-1]
                print(f"[team] {n} editors, {name}: {r['throughput']:.2f} completions/s, first token p50 "
                      f"{r['first_p50']:.0f} ms, line p50 {r['line_p50']:.0f} ms (load {r['load']['mean']:.1f})",
                      file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.close()
    rows.sort(key=lambda r: (r["editors"], r["server"]))
    commands = {name: s.cmd[s.cmd.index("serve"):] for name, s in servers.items()}
    (out / "team.json").write_text(json.dumps(dict(args=vars(a), servers=commands, rows=rows), indent=1))
    (out / "team.md").write_text(table(rows))
    plot(rows, out / "team.png")
    print(table(rows))
    print(f"wrote {out / 'team.json'}, team.md, team.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
