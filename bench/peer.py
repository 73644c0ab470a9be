"""livekv side by side with llama.cpp's llama-server (the peer of llama.vim / llama.vscode), on
the same GGUF, the same files and the same cursors.

    livekv bench peer [--llama-server PATH] [--lengths 1024,4096] [--threads 1,2] [--modes after,below]

Files of each length are real code (the scaling run's corpus). For each length, thread count
and GGUF format (the given file, and a Q8_0 re-quantization: llama.cpp's fast path), each mode
runs a few edits, alternating the two systems edit by edit:

    after  a line is inserted mid-file and completed right below it (llama.vim's common case)
    below  the cursor sits near the end; an import is added at the top, then completion goes on
           at the cursor (llama-server must re-evaluate what changed before the cursor)
    fim    the coder model (--fim-model): llama.vim's /infill layout (256 lines before the
           cursor, 64 after) against livekv's FIM stream over the whole file

livekv runs as the LSP server does: the edit marks tokens, the completion encodes them in its
own forward pass. llama-server's figures are its own timings (no HTTP): prompt_ms is the first
token (it comes from the last prompt batch), predicted_ms the decode steps after it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from livekv.bench import llama_server as LS
from livekv.bench.runner import LoadMeter, cell, log, markdown
from livekv.bench.scaling import corpus, edit_lines
from livekv.incremental.lines import line_starts, split_lines, to_offset

FIM_PREFIX_LINES, FIM_SUFFIX_LINES = 256, 64  # llama.vim's n_prefix, n_suffix


def gguf_of(model: str | None) -> Path:
    """The GGUF file both systems run: the embedded SmolLM2 (None), the coder, or a path."""
    from livekv.incremental import Config, models
    if model is None:
        return models.embedded_gguf()
    if model == models.CODER:
        return models.coder_gguf(Config().cache_path)
    if not model.endswith(".gguf") or not Path(model).is_file():
        raise FileNotFoundError(f"{model}: give a .gguf file (llama-server runs GGUF only) or {models.CODER}")
    return Path(model)


def cursor_points(text: str, mode: str, k: int) -> list[tuple[dict, int]]:
    """(edit, cursor line) for k edits of this mode on text (positions in code points)."""
    if mode == "below":
        line = int(0.9 * len(split_lines(text)))
        return [({"start": [0, 0], "end": [0, 0], "text": f"import module_{i}\n"}, line + i + 1) for i in range(k)]
    out, shift = [], 0
    for t in edit_lines(text, k):
        t += shift
        shift += 1
        out.append(({"start": [t, 0], "end": [t, 0], "text": split_lines(text)[t - shift + 1]}, t + 1))
    return out


def livekv_step(doc, edit: dict, line: int, n: int, fim: bool) -> dict:
    t0 = time.perf_counter()
    st = doc.edit_batch([(tuple(edit["start"]), tuple(edit["end"]), edit["text"])], settle=False)
    edit_ms = (time.perf_counter() - t0) * 1e3
    comp = doc.suggest(line, 0, max_new_tokens=n, multiline=False)
    steps = max(comp.steps, 1)
    return dict(system="livekv", text=comp.text, evaluated=doc.stats["tokens_encoded_last_edit"] + comp.tail_tokens,
                first_token_ms=edit_ms + comp.ttft_ms, total_ms=edit_ms + comp.total_ms,
                decode_ms_per_token=(comp.total_ms - comp.ttft_ms) / (steps - 1) if steps > 1 else None,
                keys_rotated=st["keys_rotated_last_edit"])


def peer_step(server, text: str, line: int, n: int, fim: bool) -> dict:
    starts = line_starts(text)
    c = to_offset(starts, text, line, 0)
    if fim:
        lines = split_lines(text)
        prefix = "".join(lines[max(0, line - FIM_PREFIX_LINES): line])
        suffix = "".join(lines[line: line + FIM_SUFFIX_LINES])
        a = server.infill(prefix, suffix, "", n, ["\n"])
    else:
        a = server.complete(text[:c], n, ["\n"])
    return dict(system="llama-server", text=a.text, evaluated=a.evaluated, first_token_ms=a.first_token_ms,
                total_ms=a.total_ms, decode_ms_per_token=a.decode_ms_per_token, cached=a.cached)


def run_config(engine, server, length: int, mode: str, edits: int, n: int, sink, meta: dict) -> None:
    """One length and mode on one server and engine: both open the file, then alternate."""
    from livekv.bench.hunks import apply_edits
    text = corpus(engine, length)
    fim = mode == "fim"
    doc = engine.open(f"peer:///{length}-{mode}.py", text)
    first_line = int(0.9 * len(split_lines(text))) if mode == "below" else 1
    peer_step(server, text, first_line, n, fim)       # warm both: the first prompt is a cold encode
    doc.suggest(first_line, 0, max_new_tokens=n, multiline=False)
    try:
        for k, (edit, line) in enumerate(cursor_points(text, mode, edits)):
            text = apply_edits(text, [edit])
            order = ("livekv", "peer") if k % 2 == 0 else ("peer", "livekv")
            for who in order:
                r = livekv_step(doc, edit, line, n, fim) if who == "livekv" else peer_step(server, text, line, n, fim)
                sink(dict(meta, **r, length=length, mode=mode, edit=k, tokens=doc.n))
    finally:
        engine.close(doc.uri)


def summarize(records: list[dict]) -> list[dict]:
    """p50/p90 per (system, format, threads, mode, length)."""
    keys = sorted({(r["system"], r["format"], r["threads"], r["mode"], r["length"]) for r in records},
                  key=lambda k: (k[3], k[4], k[2], k[0], k[1]))
    out = []
    for key in keys:
        rs = [r for r in records if (r["system"], r["format"], r["threads"], r["mode"], r["length"]) == key]

        def q(field, p):
            xs = sorted(r[field] for r in rs if r.get(field) is not None)
            return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
        out.append(dict(zip(("system", "format", "threads", "mode", "length"), key), edits=len(rs),
                        tokens=rs[0]["tokens"], **{f"{f}_p{int(p * 100)}": q(f, p) for f in
                        ("evaluated", "first_token_ms", "total_ms", "decode_ms_per_token") for p in (0.5, 0.9)}))
    return out


def table(summary: list[dict]) -> str:
    return markdown(["mode", "tokens", "threads", "system", "format", "re-evaluated p50 / p90",
                     "edit → first token ms p50 / p90", "whole line ms p50 / p90", "decode ms/token p50"],
                    [[s["mode"], f"{s['tokens']:,}", str(s["threads"]), s["system"], s["format"],
                      f"{cell(s['evaluated_p50'])} / {cell(s['evaluated_p90'])}",
                      f"{cell(s['first_token_ms_p50'])} / {cell(s['first_token_ms_p90'])}",
                      f"{cell(s['total_ms_p50'])} / {cell(s['total_ms_p90'])}", cell(s["decode_ms_per_token_p50"])]
                     for s in summary])


def plot(summary: list[dict], path: Path) -> None:
    """Edit -> first token, p50 (bars) and p90 (ticks), per mode and length, for each system,
    format and thread count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(dict.fromkeys(s["mode"] for s in summary))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [s for s in summary if s["mode"] == mode]
        lengths = sorted({s["tokens"] for s in rows})
        who = list(dict.fromkeys((s["system"], s["format"], s["threads"]) for s in rows))
        w = 0.8 / len(who)
        for i, key in enumerate(who):
            got = {s["tokens"]: s for s in rows if (s["system"], s["format"], s["threads"]) == key}
            xs = [j + i * w for j, n in enumerate(lengths) if n in got]
            ax.bar(xs, [got[n]["first_token_ms_p50"] for n in lengths if n in got], w,
                   label=f"{key[0]} {key[1]}, {key[2]} thr", hatch="//" if key[0] != "livekv" else None)
            ax.scatter(xs, [got[n]["first_token_ms_p90"] for n in lengths if n in got], marker="_", color="k")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(lengths))], [f"{n:,}" for n in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("file tokens")
        ax.set_ylabel("edit → first token, ms (p50 bar, p90 tick)")
        ax.set_title(f"mode {mode}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="livekv bench peer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=None, help="the llama-server executable (default: on PATH)")
    ap.add_argument("--gguf", default=None, help="the model both run (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--fim-model", default=None, help="mode fim's model: a GGUF with FIM tokens, or qwen2.5-coder-0.5b")
    ap.add_argument("--formats", default="source,Q8_0", help="source (the GGUF as given) and/or llama.cpp types")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="after,below")
    ap.add_argument("--edits", type=int, default=6, help="edits per mode and size (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--precision", default="auto", help="livekv's (Config.precision)")
    ap.add_argument("--decode-kv", default="auto", choices=("auto", "fp16", "fp32"), help="livekv's (Config.decode_kv)")
    ap.add_argument("--out", default="bench/out/peer")
    a = ap.parse_args(argv)
    try:
        binary = LS.find(a.llama_server)
    except FileNotFoundError as e:
        log(f"error: {e}")
        return 2
    import torch

    from livekv.incremental import Engine
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in a.modes.split(",") if m]
    if "fim" in modes and not a.fim_model:
        ap.error("mode fim needs --fim-model (qwen2.5-coder-0.5b, or a GGUF with FIM tokens)")
    try:
        sources = {m: gguf_of(a.fim_model if m == "fim" else a.gguf) for m in modes}
    except (FileNotFoundError, ValueError) as e:
        log(f"error: {e}")
        return 2
    records, load = [], LoadMeter()
    f = open(out / "records.jsonl", "w", encoding="utf-8")

    def sink(r):
        records.append(r)
        f.write(json.dumps(r) + "\n")
        f.flush()
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for mode in modes:
            src = sources[mode]
            engine = Engine.load(str(src), precision=a.precision, decode_kv=a.decode_kv, max_new_tokens=a.max_new_tokens)
            for fmt in a.formats.split(","):
                gguf = src if fmt == "source" else LS.requantize(binary, src, out / "gguf" / f"{src.stem}.{fmt}.gguf", fmt)
                with LS.LlamaServer(binary, gguf, threads) as server:
                    for length in [int(x) for x in a.lengths.split(",")]:
                        log(f"peer: {mode}, {length} tokens, {threads} thread(s), llama-server {fmt}")
                        run_config(engine, server, length, mode, a.edits, a.max_new_tokens, sink,
                                   dict(format=fmt, threads=threads, precision=a.precision))
                        load.sample()
    f.close()
    summary = summarize(records)
    (out / "results.json").write_text(json.dumps(dict(summary=summary, load_avg=load.summary(), argv=argv), indent=1))
    (out / "table.md").write_text(table(summary))
    plot(summary, out / "peer.png")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
