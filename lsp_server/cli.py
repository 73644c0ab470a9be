"""`livekv`: the command line. Each subcommand is a thin layer over the engine.

    livekv demo [FILE]                      a completion on a real file, edit cost vs full re-encode
    livekv complete FILE LINE COL           print the completion at (line, column), 0-based
    livekv lsp [--tcp HOST:PORT]            the language server (stdio by default)
    livekv serve [--host H] [--port P]      the websocket streaming server (--demo: browser page)
    livekv bench traces|replay|edit-cost|kernel|groups|fim ...   benchmarks (see bench/)

Config flags (--model, --strategy, --device, --dtype, --max-new-tokens, ...) map one to one onto
incremental.Config. Logs go to stderr: stdout belongs to LSP stdio and to printed results.
"""
from __future__ import annotations

import argparse
import logging
import sys

from livekv.incremental.config import add_config_arguments, config_from_arguments

BENCHES = {"traces": "livekv.bench.traces", "replay": "livekv.bench.replay", "edit-cost": "livekv.bench.edit_cost",
           "kernel": "livekv.bench.kernel", "groups": "livekv.bench.groups", "fim": "livekv.bench.fim",
           "report": "livekv.bench.report"}


def _complete(ns) -> int:
    from livekv.incremental import Engine
    cfg = config_from_arguments(ns)
    try:
        text = open(ns.file, encoding="utf-8").read()
    except OSError as e:
        print(f"livekv: cannot read {ns.file}: {e.strerror}", file=sys.stderr)
        return 2
    eng = Engine.from_config(cfg)
    doc = eng.open(f"file://{ns.file}", text)
    try:
        print(doc.complete(ns.line, ns.col))
    except ValueError as e:
        print(f"livekv: {e}", file=sys.stderr)
        return 2
    return 0


def _demo(ns) -> int:
    from livekv.bench.demo import run_demo
    return run_demo(config_from_arguments(ns), ns.file)


def _lsp(ns) -> int:
    from livekv.lsp_server.server import run_server
    return run_server(config_from_arguments(ns), tcp=ns.tcp)


def _serve(ns) -> int:
    from livekv.lsp_server.ws_server import run_ws_server
    return run_ws_server(config_from_arguments(ns), ns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # benchmarks own their flags; forward the rest of the line untouched
        if len(argv) < 2 or argv[1] not in BENCHES:
            print(f"usage: livekv bench {{{','.join(BENCHES)}}} ...", file=sys.stderr)
            return 2
        import importlib
        return importlib.import_module(BENCHES[argv[1]]).main(argv[2:]) or 0
    p = argparse.ArgumentParser(prog="livekv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("complete", help="print the completion at FILE:LINE:COL (0-based)")
    c.add_argument("file")
    c.add_argument("line", type=int)
    c.add_argument("col", type=int)
    d = sub.add_parser("demo", help="a completion on a real file, edit cost next to full re-encode")
    d.add_argument("file", nargs="?", default=None, help="a Python file (default: a stdlib module)")
    s = sub.add_parser("lsp", help="the language server over stdio (or --tcp)")
    s.add_argument("--tcp", default=None, metavar="HOST:PORT")
    w = sub.add_parser("serve", help="the websocket streaming server")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=8765)
    w.add_argument("--token", default=None, help="a secret clients must send in their first message")
    w.add_argument("--allow-origin", action="append", default=[], help="a browser Origin to accept (repeatable)")
    w.add_argument("--max-message-bytes", type=int, default=4 << 20)
    w.add_argument("--demo", action="store_true", help="also serve the browser demo page")
    for sp in (c, d, s, w):
        add_config_arguments(sp)
    ns = p.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return {"complete": _complete, "demo": _demo, "lsp": _lsp, "serve": _serve}[ns.cmd](ns)
    except ValueError as e:  # bad settings: say what was wrong, no traceback
        print(f"livekv: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
