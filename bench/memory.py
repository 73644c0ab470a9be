"""Host memory as a person opens many files and closes them: does it come back?

    livekv bench memory [--files 40] [--file-tokens 1500] [--max-cache-tokens 12000]
                        [--precision auto] [--out bench/out/memory]

Runs the LSP server's own session (repository context: every open file a position group of one
cache, least recently used evicted past maxCacheTokens) in this process: opens the largest
stdlib modules one by one (each cut to --file-tokens), completes in each as the person would,
then closes them all. Records the process's resident memory (VmRSS) after the model loads,
after each open, and after the last close; the cache's own bytes per 1,000 tokens come from the
engine. Writes memory.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

from livekv.incremental import Engine
from livekv.lsp_server.repo_context import Grouped
from livekv.lsp_server.session import Session

from .edit_cost import real_file

MIB = 1 << 20


def resident() -> int:
    """This process's resident memory in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stdlib_files(n: int) -> list[Path]:
    """The n largest modules of the stdlib (real code every machine has)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.stat().st_size > 4096), key=lambda p: -p.stat().st_size)
    assert len(files) >= n, f"the stdlib at {root} has only {len(files)} modules over 4 KiB; ask for fewer --files"
    return files[:n]


def run(engine: Engine, files: list[Path], file_tokens: int, max_cache_tokens: int) -> dict:
    session = Session(Grouped(engine, engine.config.strategy, max_cache_tokens, roots=[]), encoding="utf-32")
    texts = [real_file(str(p), file_tokens, engine.tokenizer)[1] for p in files]
    uris = [f"file://{p}" for p in files]
    steps = [dict(step="loaded", rss=resident(), tokens=0)]
    for uri, text in zip(uris, texts):
        session.open(uri, text, 1)
        last = text.count("\n")
        session.complete(uri, last, 0)  # the person types in it: it becomes the active group
        ws = session.docs.ws
        steps.append(dict(step=f"open {Path(uri).name}", rss=resident(), tokens=ws.tokens(),
                          evicted=len(ws.evicted), kv_capacity=ws.kv.capacity))
    for uri in uris:
        session.close(uri)
    ws = session.docs.ws
    steps.append(dict(step="all closed", rss=resident(), tokens=ws.tokens(), kv_capacity=ws.kv.capacity))
    per_token = ws.kv.bytes_per_token()
    base, peak, end = steps[0]["rss"], max(s["rss"] for s in steps), steps[-1]["rss"]
    return dict(files=len(files), file_tokens=file_tokens, max_cache_tokens=max_cache_tokens,
                precision=engine.precision, dtype=str(engine.model.dtype).removeprefix("torch."),
                kv_bytes_per_1k_tokens=per_token * 1000, rss_loaded=base, rss_peak=peak, rss_closed=end,
                kept_after_close=end - base, grown_at_peak=peak - base, steps=steps)


def summary(r: dict) -> str:
    return (f"{r['files']} files of <= {r['file_tokens']} tokens, maxCacheTokens {r['max_cache_tokens']:,} "
            f"({r['dtype']} cache: {r['kv_bytes_per_1k_tokens'] / MIB:.1f} MiB per 1,000 tokens): "
            f"RSS {r['rss_loaded'] / MIB:.0f} MiB loaded, {r['rss_peak'] / MIB:.0f} MiB at peak, "
            f"{r['rss_closed'] / MIB:.0f} MiB after closing all "
            f"(+{r['kept_after_close'] / MIB:.0f} MiB kept of +{r['grown_at_peak'] / MIB:.0f} MiB)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--file-tokens", type=int, default=1500, help="each file cut to its first lines up to this")
    p.add_argument("--max-cache-tokens", type=int, default=12_000)
    p.add_argument("--precision", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/out/memory")
    a = p.parse_args(argv)
    engine = Engine.load(model=a.model, precision=a.precision, max_new_tokens=a.max_new_tokens)
    try:
        r = run(engine, stdlib_files(a.files), a.file_tokens, a.max_cache_tokens)
    except (AssertionError, ValueError) as e:
        print(f"livekv bench memory: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(r, indent=1))
    print(summary(r))
    print(f"wrote {out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
