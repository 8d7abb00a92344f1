#!/usr/bin/env bash
# Install imcap into ./.venv with Python 3.11.
#   scripts/install.sh         the package (enough to caption images)
#   scripts/install.sh --serve plus the web UI and REST API (`imcap serve`)
#   scripts/install.sh --dev   plus training, metrics, serving and test tools, Java (METEOR and the PTB
#                              tokenizer), Chromium (the browser test of the web UI) and WordNet 3.0
#                              (the concept table's builder, benchmarks/bench_naming.py)
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
  if [ ! -f /usr/share/wordnet/data.noun ]; then  # WordNet 3.0: the concept table's builder and its test
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
  fi
  if [ ! -x /usr/bin/chromium ]; then  # Debian's build: Playwright's own browser download needs internet
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  .venv/bin/python -m pip install -q -e '.[dev]'
elif [ "${1:-}" = "--serve" ]; then
  .venv/bin/python -m pip install -q -e '.[serve]'
else
  .venv/bin/python -m pip install -q -e .
fi
