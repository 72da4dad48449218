#!/usr/bin/env bash
# Create the project's virtual environment and install cocomix_nb with its development tools.
# Usage: bash tools/setup.sh [VENV_DIR]   (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-${COCOMIX_VENV:-.venv}}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch and torchvision first, pinned as one pair: torchvision 0.29.1 imports only beside torch 2.14.1.
"$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
# The report test opens the rendered pages in Debian's Chromium; install it where this script may.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq chromium chromium-driver >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "Note: chromium and chromedriver not found; the browser tests of the report will be skipped." \
         "Install Debian's chromium and chromium-driver packages to run them." >&2
  fi
fi
echo "Installed cocomix_nb $("$venv/bin/python" -c 'import cocomix_nb; print(cocomix_nb.__version__)') into $venv"
