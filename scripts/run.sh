#!/usr/bin/env bash
# Set up (idempotent) and run the gateway. With no arguments: the embedded default config
# (SIP 127.0.0.1:5060 udp+tcp, API 127.0.0.1:8080, built-in demo voice app for any number).
# Extra arguments go to `sautikit-gateway run`, e.g. --config gateway.toml
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sautikit-gateway run "$@"
