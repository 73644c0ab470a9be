"""FIM as a token stream against rebuilding the FIM prompt, on a model with FIM tokens.

A person moves the cursor around a real file and asks for a completion at each stop. `stream`
keeps one PSM stream and moves the suffix marker (a PIE splice); `rebuild` encodes
<fim_prefix> prefix <fim_suffix> suffix <fim_middle> from scratch at every stop.

    livekv bench fim [--model qwen2.5-coder-0.5b] [--file F] [--tokens 1500] [--stops 10]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from livekv.incremental import Engine
from livekv.incremental.fim import FimStream

from .edit_cost import real_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livekv bench fim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--file", default=None)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--stops", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/fim")
    a = p.parse_args(argv)
    eng = Engine.load(model=a.model, max_new_tokens=a.max_new_tokens)
    if eng.fim_ids is None:
        print(f"livekv: model {eng.model_name!r} has no FIM tokens; use qwen2.5-coder-0.5b (pip install '.[coder]')",
              file=sys.stderr)
        return 2
    path, text = real_file(a.file, a.tokens, eng.tokenizer)
    stream = eng.open("file:///stream.py", text)
    lines = text.split("\n")
    rng = random.Random(a.seed)
    stops = sorted(rng.sample([i for i, s in enumerate(lines[:-1]) if s.strip()], a.stops))
    rng.shuffle(stops)  # a person jumps around the file
    rows = []
    for line in stops:
        col = len(lines[line]) - len(lines[line].lstrip())  # after the indentation
        t0 = time.perf_counter()
        got = stream.complete(line, col, multiline=False)
        t_stream = (time.perf_counter() - t0) * 1e3
        ttft_stream = stream.stats["last_completion"]["ttft_ms"]
        t0 = time.perf_counter()
        fresh = FimStream.open(eng, "file:///rebuild.py", text, "pie", gap_at=stream.offset(line, col))
        want = fresh.complete(line, col, multiline=False)
        t_rebuild = (time.perf_counter() - t0) * 1e3
        ttft_rebuild = t_rebuild - fresh.stats["last_completion"]["total_ms"] + fresh.stats["last_completion"]["ttft_ms"]
        rows.append(dict(line=line, stream=got, rebuild=want, stream_ms=t_stream, rebuild_ms=t_rebuild,
                         ttft_stream_ms=ttft_stream, ttft_rebuild_ms=ttft_rebuild,
                         stale=stream.stats["stale_tokens"]))
        print(f"line {line:4d}: stream {ttft_stream:7.0f} ms first token, rebuild {ttft_rebuild:7.0f} ms; "
              f"{'same' if got == want else 'differ'}: {got.strip()[:30]!r} / {want.strip()[:30]!r}", file=sys.stderr)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    result = dict(model=eng.model_name, file=path, tokens=stream.n, stops=len(rows),
                  ttft_ms_p50=dict(stream=med("ttft_stream_ms"), rebuild=med("ttft_rebuild_ms")),
                  speedup=med("ttft_rebuild_ms") / med("ttft_stream_ms"),
                  agreement=statistics.mean(r["stream"] == r["rebuild"] for r in rows), rows=rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fim.json").write_text(json.dumps(result, indent=1))
    print(f"{eng.model_name}, {stream.n} tokens, {len(rows)} cursor stops: first token p50 stream "
          f"{result['ttft_ms_p50']['stream']:.0f} ms vs rebuild {result['ttft_ms_p50']['rebuild']:.0f} ms "
          f"({result['speedup']:.1f}x); agreement {result['agreement']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
