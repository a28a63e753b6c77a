#!/usr/bin/env bash
# Idempotent setup on Debian 12 (as root): system packages, a venv in .venv, the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(sip-tester espeak-ng kamailio sox libsndfile1 python3-venv python3-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  apt-get install -y -qq "${missing[@]}"
fi
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
