#!/usr/bin/env bash
# Idempotent setup on Debian 12 (as root): system packages, a venv in .venv, the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# kamailio-*-modules: the WebRTC front (websocket, tls, http_client); rtpengine-daemon alone, not
# the rtpengine metapackage (it pulls a DKMS kernel module: the node runs it in userspace).
pkgs=(sip-tester espeak-ng kamailio kamailio-websocket-modules kamailio-tls-modules
  kamailio-utils-modules rtpengine-daemon chromium nodejs npm sox libsndfile1 python3-venv
  python3-dev)
missing=()
for p in "${pkgs[@]}"; do
  # a node.js from elsewhere (not the Debian package) is fine too
  if [[ $p == nodejs || $p == npm ]] && command -v "${p/nodejs/node}" >/dev/null; then continue; fi
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
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
# The browser phone's JsSIP (served by the demo routes) and the tests' Chromium driver
# (playwright-core drives Debian's /usr/bin/chromium; it downloads no browser).
npm_stamp=node_modules/.installed-$(sha256sum package-lock.json | cut -c1-16)
if [[ ! -f $npm_stamp ]]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
  touch "$npm_stamp"
fi
# The browser phone's JsSIP bundle (npm's jssip ships CommonJS only): an IIFE exposing `JsSIP`,
# served by the demo routes as /demo/phone/jssip.js (gateway/webrtc/assets.py: JSSIP_BUNDLE).
jssip_bundle=node_modules/.sautikit/jssip.js
if [[ ! -f $jssip_bundle || package-lock.json -nt $jssip_bundle ]]; then
  mkdir -p "$(dirname "$jssip_bundle")"
  node_modules/.bin/esbuild node_modules/jssip/lib/JsSIP.js --bundle --format=iife \
    --global-name=JsSIP --outfile="$jssip_bundle" --log-level=warning
fi
