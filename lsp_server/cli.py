"""`livekv`: the command line. Each subcommand is a thin layer over the engine.

    livekv demo [FILE]                      a completion on a real file, edit cost vs full re-encode
    livekv complete FILE LINE COL           print the completion at (line, column), 0-based
    livekv lsp [--tcp HOST:PORT]            the language server (stdio by default)
    livekv serve [--host H] [--port P]      the websocket streaming server (--demo: browser page;
                                            --replicas N: N replicas under Ray Serve)
    livekv settings [--json|--markdown W]   every setting: flag, LSP name, type, default
    livekv bench traces|replay|edit-cost|kernel|groups|fim|report|peer|memory|gpu|precision|team|
                 team-step|heal-draft|compile-cpu ...  benchmarks (see bench/)

Flags are generated from the settings dataclasses: the engine's Config (--model, --strategy,
--max-new-tokens, ...) on every command, plus LspOptions on `lsp` and ServeOptions on `serve`.
Logs go to stderr: stdout belongs to LSP stdio and to printed results.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from livekv.incremental.config import Config

from .options import LspOptions, ServeOptions, schema, schema_markdown

BENCHES = {"traces": "livekv.bench.traces", "replay": "livekv.bench.replay", "edit-cost": "livekv.bench.edit_cost",
           "kernel": "livekv.bench.kernel", "groups": "livekv.bench.groups", "fim": "livekv.bench.fim",
           "report": "livekv.bench.report", "peer": "livekv.bench.peer",
           "memory": "livekv.bench.memory", "gpu": "livekv.bench.gpu", "precision": "livekv.bench.precision",
           "team": "livekv.bench.team", "team-step": "livekv.bench.team_step",
           "heal-draft": "livekv.bench.heal_draft", "compile-cpu": "livekv.bench.compile_cpu"}


def _complete(ns) -> int:
    from livekv.incremental import Engine

    from .repo_context import Alone
    from .session import Session
    cfg = Config.from_arguments(ns)
    try:
        text = open(ns.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"livekv: cannot read {ns.file}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    # the servers' session, so that the answer is theirs at the same cursor
    session = Session(Alone(Engine.from_config(cfg), cfg.strategy), encoding="utf-32")
    session.open(f"file://{ns.file}", text, 0)
    answer = session.complete(f"file://{ns.file}", ns.line, ns.col)  # ValueError: not a position
    print(answer.texts[0] if answer.texts else "")
    return 0


def _demo(ns) -> int:
    from livekv.bench.demo import run_demo
    return run_demo(Config.from_arguments(ns), ns.file)


def _lsp(ns) -> int:
    from .server import run_server
    return run_server(Config.from_arguments(ns), LspOptions.from_arguments(ns))


def _serve(ns) -> int:
    config, opts = Config.from_arguments(ns), ServeOptions.from_arguments(ns)
    if opts.replicas:
        try:
            from .ray_serve import run_ray_server
        except ModuleNotFoundError as e:  # its message names the extra to install
            print(f"livekv: {e}", file=sys.stderr)
            return 2
        return run_ray_server(config, opts)
    from .ws_server import run_ws_server
    return run_ws_server(config, opts)


def _settings(ns) -> int:
    if ns.markdown:
        print(schema_markdown(ns.markdown), end="")
    else:
        print(json.dumps(schema(), indent=1))
    return 0


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
    c.add_argument("col", type=int, help="the column, in code points")
    d = sub.add_parser("demo", help="a completion on a real file, edit cost next to full re-encode")
    d.add_argument("file", nargs="?", default=None, help="a Python file (default: a stdlib module)")
    s = sub.add_parser("lsp", help="the language server over stdio (or --tcp)")
    w = sub.add_parser("serve", help="the websocket streaming server")
    t = sub.add_parser("settings", help="every setting of every layer, as JSON (or a markdown table)")
    t.add_argument("--markdown", choices=("lsp", "serve"), default=None,
                   help="a table: lsp (the editor settings) or serve (the websocket server's flags)")
    for sp in (c, d, s, w):
        Config.add_arguments(sp)
    LspOptions.add_arguments(s)
    ServeOptions.add_arguments(w)
    ns = p.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return {"complete": _complete, "demo": _demo, "lsp": _lsp, "serve": _serve, "settings": _settings}[ns.cmd](ns)
    except ValueError as e:  # bad settings or input: say what was wrong, no traceback
        print(f"livekv: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
