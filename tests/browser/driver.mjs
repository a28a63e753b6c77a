// Headless Debian Chromium for the tests, driven over JSON lines (tests/integration/browser.py).
//
//   node tests/browser/driver.mjs --mic tone.wav [--log browser.log]
//
// stdin, one request a line:  {"id": 1, "op": "goto", "url": "http://..."}
//                             {"id": 2, "op": "eval", "expr": "sautiPhone.state()"}  (promises awaited)
//                             {"id": 3, "op": "close"}
// stdout, one reply a line:   {"id": 1, "ok": true, "value": ...} | {"id": 1, "ok": false, "error": "..."}
// First line once Chromium is up: {"id": 0, "ok": true, "value": {"version", "pid"}}.
// Page console lines and errors go to stderr (and the --log file) prefixed [page].
// The fake microphone loops the --mic WAV. EOF on stdin closes the browser too.
import fs from 'node:fs';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const argv = process.argv.slice(2);
const arg = (name) => {
  const i = argv.indexOf(name);
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : null;
};
const mic = arg('--mic');
const logPath = arg('--log');
const executablePath = arg('--chromium') || process.env.SAUTI_CHROMIUM || '/usr/bin/chromium';
const logFile = logPath ? fs.createWriteStream(logPath, { flags: 'a' }) : null;
const t0 = Date.now();

function log(line) {
  const text = `${((Date.now() - t0) / 1000).toFixed(3)} ${line}\n`;
  process.stderr.write(text);
  if (logFile) logFile.write(text);
}

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const args = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];
if (mic) args.push(`--use-file-for-fake-audio-capture=${mic}`);  // loops (no %noloop)

let browser = null;
let page = null;
let closing = null;

async function shutdown(code) {
  if (!closing) {
    closing = (async () => {
      const kill = setTimeout(() => process.exit(code), 5000);
      try {
        if (browser) await browser.close();
      } catch (e) {
        log(`[driver] close: ${e.message}`);
      }
      clearTimeout(kill);
      if (logFile) await new Promise((r) => logFile.end(r));
      process.exit(code);
    })();
  }
  return closing;
}

async function handle(req) {
  switch (req.op) {
    case 'goto': {
      const res = await page.goto(req.url, { waitUntil: 'load', timeout: req.timeout_ms || 15000 });
      return { status: res ? res.status() : null, url: page.url() };
    }
    case 'eval':
      return await page.evaluate(req.expr);
    case 'close':
      return null;
    default:
      throw new Error(`unknown op ${JSON.stringify(req.op)}`);
  }
}

async function main() {
  browser = await chromium.launch({ executablePath, headless: true, args, timeout: 30000 });
  const context = await browser.newContext({ permissions: ['microphone'] });
  page = await context.newPage();
  page.on('console', (m) => log(`[page] ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log(`[page] error: ${e.stack || e.message}`));
  page.on('requestfailed', (r) => log(`[page] request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('crash', () => log('[page] crashed'));
  browser.on('disconnected', () => {
    if (!closing) {
      log('[driver] browser disconnected');
      shutdown(3);
    }
  });
  reply({ id: 0, ok: true, value: { version: browser.version(), pid: process.pid } });

  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', async (line) => {
    if (!line.trim()) return;
    let req;
    try {
      req = JSON.parse(line);
    } catch (e) {
      reply({ id: null, ok: false, error: `bad request: ${e.message}` });
      return;
    }
    try {
      const value = await handle(req);
      reply({ id: req.id, ok: true, value: value === undefined ? null : value });
      if (req.op === 'close') await shutdown(0);
    } catch (e) {
      reply({ id: req.id, ok: false, error: String(e && e.message ? e.message : e) });
    }
  });
  rl.on('close', () => shutdown(0));
}

process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));
main().catch((e) => {
  log(`[driver] ${e.stack || e.message}`);
  reply({ id: 0, ok: false, error: String(e.message || e) });
  shutdown(2);
});
