#!/usr/bin/env bash
# Install imcap into ./.venv with Python 3.11.
#   scripts/install.sh         the package (enough to caption images)
#   scripts/install.sh --dev   plus training, metrics and test tools, and Java (METEOR and the PTB tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

if [ "${1:-}" = "--dev" ]; then
  if ! command -v java >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq default-jre-headless >/dev/null
  fi
  .venv/bin/python -m pip install -q -e '.[dev]'
else
  .venv/bin/python -m pip install -q -e .
fi
