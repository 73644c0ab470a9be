#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#   Python: .venv with livekv[test]; Debian: neovim (a real LSP client) and chromium (the browser
#   demo test); npm: the VS Code extension's dependencies (its node test spawns the real server).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=""
  command -v nvim >/dev/null || need="$need neovim"
  command -v chromium >/dev/null || need="$need chromium"
  if [ -n "$need" ]; then
    apt-get install -y -q $need >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $need >/dev/null; }
  fi
fi
if [ -f editor-clients/vscode/package-lock.json ] && command -v npm >/dev/null; then
  (cd editor-clients/vscode && npm ci --silent --no-audit --no-fund && npm run --silent compile)
fi
# Convert the embedded model once before the tests start their servers in parallel.
.venv/bin/python -P -c "from livekv import Engine; Engine.load()"
# -P: the checkout's root stays off sys.path, where kernels/ would shadow Hugging Face's kernels package
exec .venv/bin/python -P -m pytest -q "$@"
