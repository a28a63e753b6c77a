"""The node's SIP front: Kamailio in front of the pjsua2 worker processes.

Carriers send to Kamailio on the public `[sip] listen` address (UDP and TCP); Kamailio hands each
new INVITE to a worker from its dispatcher list (round robin, OPTIONS-probed, failover on
486/503/timeout, 503 + Retry-After when none is left) and record-routes, so every later request of
the dialog goes through it to the worker that answered. Workers place outbound calls through it
too (it is their outbound proxy), so a carrier only ever sees the front's address.

This module renders the configuration from `config/kamailio/kamailio.cfg.tmpl`, checks it with
`kamailio -c`, runs Kamailio in the foreground under asyncio (logs into Python logging), restarts
it if it dies, and talks to it over JSON-RPC on a UNIX datagram socket in the runtime directory:
`dispatcher.set_state` (drain a worker), `dispatcher.reload` (list changed), `dispatcher.list`.

    python -m gateway.kamailio render --listen 0.0.0.0:5060 \\
        --worker sip:127.0.0.1:25100 --worker sip:127.0.0.1:25101 --out /var/lib/sautikit/kam
    python -m gateway.kamailio render --config gateway.toml
    python -m gateway.kamailio rpc --out /var/lib/sautikit/kam dispatcher.list
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import glob
import ipaddress
import itertools
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from config.settings import is_loopback_host
from gateway.childproc import die_with_parent

log = logging.getLogger(__name__)
proc_log = logging.getLogger(__name__ + ".proc")  # Kamailio's own stderr/stdout lines

CFG_NAME = "kamailio.cfg"
DIALOG_DB = "dialogs"  # db_text directory of the dialog module's tables
# db_text table headers (Kamailio 5.6 schema: dialog version 7, dialog_vars 1).
_DBTEXT_TABLES = {
    "version": "id(int,auto) table_name(string) table_version(int) \n0:dialog:7\n0:dialog_vars:1\n",
    "dialog": "id(int,auto) hash_entry(int) hash_id(int) callid(string) from_uri(string) "
    "from_tag(string) to_uri(string) to_tag(string) caller_cseq(string) callee_cseq(string) "
    "caller_route_set(string,null) callee_route_set(string,null) caller_contact(string) "
    "callee_contact(string) caller_sock(string) callee_sock(string) state(int) start_time(int) "
    "timeout(int) sflags(int) iflags(int) toroute_name(string,null) req_uri(string) "
    "xdata(string,null) \n",
    "dialog_vars": "id(int,auto) hash_entry(int) hash_id(int) dialog_key(string) "
    "dialog_value(string) \n",
}
LIST_NAME = "dispatcher.list"
RPC_NAME = "rpc.sock"
PID_NAME = "kamailio.pid"
TLS_CFG_NAME = "tls.cfg"

# Dispatcher list flags (see the module's docs): 4 admin-disabled, 8 probing.
_FLAG_DISABLED = 4
_FLAG_PROBING = 8
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_STATES = {"A": "active", "I": "inactive", "T": "trying", "D": "disabled"}


# rtpengine flags (10.5: no `WebRTC` shortcut yet). Towards a worker: plain RTP/AVP, no ICE, RTCP
# on its own port. Towards a browser: DTLS-SRTP (rtpengine passive, the browser connects), ICE,
# rtcp-mux and a=mid as browsers need. Codecs pass untouched (both sides do G.711).
RTPE_COMMON = "replace-origin replace-session-connection SDES-off"
RTPE_TO_SIP = f"{RTPE_COMMON} rtcp-mux-demux DTLS=off ICE=remove RTP/AVP"
RTPE_TO_BROWSER = f"{RTPE_COMMON} rtcp-mux-offer generate-mid DTLS=passive ICE=force RTP/SAVPF"
# An answer to a browser's offer (setup:actpass): no DTLS role forced. rtpengine took the active
# role when it saw the offer (and starts the handshake once ICE connects); forcing passive in the
# answer resets that context and the handshake never completes (measured: dtlsState stuck at
# "connecting", no audio either way).
RTPE_ANSWER_TO_BROWSER = f"{RTPE_COMMON} rtcp-mux-offer generate-mid ICE=force RTP/SAVPF"


@dataclass(frozen=True)
class WebRtcFront:
    """The browsers' side of the front: a WebSocket listener, registrar, token checks through
    the node's API (`check_url`, `front_secret`) and media through rtpengine."""

    listen_host: str
    listen_port: int
    domain: str
    check_url: str
    front_secret: str = field(repr=False)
    max_expires_s: int = 300
    rtpengine_sock: str = "udp:127.0.0.1:22222"
    tls_cert: str | None = None
    tls_key: str | None = None


class KamailioError(RuntimeError):
    """Kamailio refused the configuration, did not start, or an RPC failed."""


@dataclass(frozen=True)
class KamailioConfig:
    """What the front needs; `render` turns it into kamailio.cfg and dispatcher.list.

    `destinations` are worker SIP URIs (`sip:127.0.0.1:25101`, or workers of other nodes);
    `disabled` are those set inactive by the supervisor (written as admin-disabled, so a
    restart or reload keeps them out). Timers are in milliseconds.
    """

    listen_host: str
    listen_port: int
    destinations: list[str]
    runtime_dir: Path
    children: int = 4
    ping_interval_s: int = 5
    binary: str = "kamailio"
    group: int = 1
    # Address carriers must use when it differs from the listen address (NAT, cloud VMs).
    advertise: str | None = None
    # First reply (100 Trying is enough) from a worker within this, or try the next worker.
    # Also the timeout of OPTIONS probes.
    fr_timer_ms: int = 2000
    # Final reply after a provisional one (inbound to a worker, outbound to a carrier).
    fr_inv_timer_ms: int = 120000
    # First reply from a carrier (outbound calls, in-dialog requests towards the carrier).
    out_fr_timer_ms: int = 5000
    retry_after_s: int = 5
    # Failed probes before an active worker turns inactive (it stays selectable while trying).
    probing_threshold: int = 1
    # ds_select_dst algorithm: 4 round robin (see config/kamailio/README.md for why).
    algorithm: int = 4
    # Kamailio's own log level: -1 errors, 0 warnings, 1 notices, 2 info, 3 debug.
    log_level: int = 1
    module_path: str | None = None  # found at render time when not given
    disabled: frozenset[str] = field(default_factory=frozenset)
    # CIDRs that may send INVITEs from outside (carriers, PBXs, SBCs); others get 403.
    allowed_sources: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Requests outside dialogs per source address per window before it is dropped; 0: no limit.
    flood_limit: int = 100
    flood_window_s: int = 1
    # Inbound calls a worker takes (its admission limit): a worker with that many dialogs through
    # this front is not offered another call. 0: offer every call (the worker answers 503).
    max_load: int = 0
    # Largest INVITE relayed to a worker (over UDP; measured with the PyPI pjsua2 2.15.1: a
    # worker takes 60 KB datagrams, but only ~3.9 KB over TCP, where PJSIP_MAX_PKT_LEN = 4000
    # applies). Larger ones lose the headers workers do not use, and get 513 if still larger.
    max_message_bytes: int = 8192
    # More Via headers than this: 483 Too Many Hops.
    max_vias: int = 20
    # A worker that answers 503 "overloaded" (its event loop lags) is offered no call for this
    # many seconds, or until the node reports it recovered (`set_lagging`).
    lag_hold_s: int = 2
    webrtc: WebRtcFront | None = None

    @property
    def cfg_path(self) -> Path:
        return self.runtime_dir / CFG_NAME

    @property
    def list_path(self) -> Path:
        return self.runtime_dir / LIST_NAME

    @property
    def rpc_socket(self) -> Path:
        return self.runtime_dir / RPC_NAME

    @property
    def pid_path(self) -> Path:
        return self.runtime_dir / PID_NAME


# --------------------------------------------------------------------------- rendering


def normalize_destination(value: str) -> str:
    """`127.0.0.1:25101` or `sip:127.0.0.1:25101` -> `sip:127.0.0.1:25101`, the form Kamailio
    lists (and `dispatcher.set_state` matches) a destination by."""
    v = value.strip()
    if not v.lower().startswith(("sip:", "sips:")):
        v = "sip:" + v
    if any(c.isspace() for c in v) or not _host_of(v):
        raise ValueError(f"bad worker address {value!r}")
    return v


def find_module_path() -> str:
    """Kamailio's module directory on this machine (Debian multiarch, RPM, source installs)."""
    machine = platform.machine()
    candidates = [
        f"/usr/lib/{machine}-linux-gnu/kamailio/modules",
        "/usr/lib/x86_64-linux-gnu/kamailio/modules",
        "/usr/lib/aarch64-linux-gnu/kamailio/modules",
        *sorted(glob.glob("/usr/lib/*/kamailio/modules")),
        "/usr/lib64/kamailio/modules",
        "/usr/lib/kamailio/modules",
        "/usr/local/lib64/kamailio/modules",
        "/usr/local/lib/kamailio/modules",
    ]
    for c in candidates:
        if Path(c, "dispatcher.so").is_file():
            return c
    return candidates[0]  # not installed here: the Debian path for this architecture


def find_binary(name: str = "kamailio") -> str | None:
    """The Kamailio executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin"):
        p = Path(d, name)
        if "/" not in name and p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def template_text() -> str:
    try:
        res = resources.files("config").joinpath("kamailio", "kamailio.cfg.tmpl")
        return res.read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        here = Path(__file__).resolve().parents[1] / "config" / "kamailio" / "kamailio.cfg.tmpl"
        return here.read_text(encoding="utf-8")


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]", "*")


def _host_of(uri: str) -> str:
    rest = uri.split(":", 1)[1].split(";", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1 : rest.index("]")]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def _sock_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _primary_address() -> str:
    """The address of the interface with the default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _listen_lines(cfg: KamailioConfig) -> str:
    """Sockets: the public one(s) for carriers, plus loopback for local workers.

    Workers on this host talk to Kamailio over 127.0.0.1 (mhomed picks that socket towards them,
    and record_route then puts both addresses in the route set), so their traffic never leaves
    the host and their source address matches the dispatcher list.
    """
    port = cfg.listen_port
    adv = ""
    if cfg.advertise:
        a = cfg.advertise
        adv = (
            f" advertise {a}"
            if re.search(r":\d+$", a.rsplit("]", 1)[-1])
            else (f" advertise {_sock_host(a)}:{port}")
        )
    host = cfg.listen_host
    if _is_wildcard(host) and not adv:
        # Every local address (loopback included), one socket each: replies and Record-Route
        # carry the address a request came in on.
        return f"port={port}"
    if _is_wildcard(host):
        host = _primary_address()
    h = _sock_host(host)
    lines = [f"listen=udp:{h}:{port}{adv}", f"listen=tcp:{h}:{port}{adv}"]
    local_workers = any(is_loopback_host(_host_of(d)) for d in cfg.destinations)
    if not is_loopback_host(host) and local_workers:
        lines += [f"listen=udp:127.0.0.1:{port}", f"listen=tcp:127.0.0.1:{port}"]
    return "\n".join(lines)


def _validate(cfg: KamailioConfig) -> list[str]:
    if not 0 < cfg.listen_port < 65536:
        raise ValueError(f"listen_port {cfg.listen_port} out of range")
    for name in (
        "children",
        "ping_interval_s",
        "group",
        "fr_timer_ms",
        "fr_inv_timer_ms",
        "out_fr_timer_ms",
        "retry_after_s",
        "probing_threshold",
        "lag_hold_s",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    if not cfg.runtime_dir.is_absolute():
        raise ValueError("runtime_dir must be absolute (Kamailio resolves paths from run_dir)")
    longest = str(cfg.runtime_dir / ".rpc-4194304-999999.sock")
    if len(longest.encode()) > _SUN_PATH_MAX:
        raise ValueError(
            f"runtime_dir {cfg.runtime_dir} is too long for a UNIX socket path "
            f"({_SUN_PATH_MAX} bytes at most); use a shorter directory"
        )
    if cfg.max_load < 0 or cfg.flood_limit < 0:
        raise ValueError("max_load and flood_limit must be >= 0")
    if not 1 <= cfg.flood_window_s <= 3600:
        raise ValueError("flood_window_s must be 1-3600")
    if not 1000 <= cfg.max_message_bytes <= 65000:
        raise ValueError("max_message_bytes must be 1000-65000")
    if not 1 <= cfg.max_vias <= 1000:
        raise ValueError("max_vias must be 1-1000")
    allowed_networks(cfg.allowed_sources)
    dests = [normalize_destination(d) for d in cfg.destinations]
    if len(set(dests)) != len(dests):
        raise ValueError("duplicate worker destinations")
    return dests


_WEBRTC_KEYS = ("WS_LISTEN", "WS_PORT", "TLS_CFG", "WEBRTC_DOMAIN", "WEBRTC_TTL",
                "WEBRTC_CHECK_URL", "WEBRTC_FRONT_SECRET", "RTPENGINE_SOCK", "RTPE_TO_SIP",
                "RTPE_TO_BROWSER", "RTPE_ANSWER_TO_BROWSER")


def _webrtc_values(cfg: KamailioConfig) -> dict[str, str]:
    w = cfg.webrtc
    if w is None:  # the sections using them are left out (#!ifdef WITH_WEBRTC)
        return dict.fromkeys(_WEBRTC_KEYS, "0")
    if not 0 < w.listen_port < 65536 or w.listen_port == cfg.listen_port:
        raise ValueError(f"webrtc listen port {w.listen_port}: out of range or the SIP port")
    if not re.fullmatch(r"[A-Za-z0-9.-]+", w.domain):
        raise ValueError(f"webrtc domain {w.domain!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,}", w.front_secret):
        raise ValueError("webrtc front_secret: 16+ URL-safe characters")
    proto = "tls" if w.tls_cert else "tcp"
    return {
        "WS_LISTEN": f"listen={proto}:{_sock_host(w.listen_host)}:{w.listen_port}",
        "WS_PORT": str(w.listen_port),
        "TLS_CFG": str(cfg.runtime_dir / TLS_CFG_NAME),
        "WEBRTC_DOMAIN": w.domain,
        "WEBRTC_TTL": str(w.max_expires_s),
        "WEBRTC_CHECK_URL": w.check_url,
        "WEBRTC_FRONT_SECRET": w.front_secret,
        "RTPENGINE_SOCK": w.rtpengine_sock,
        "RTPE_TO_SIP": RTPE_TO_SIP,
        "RTPE_TO_BROWSER": RTPE_TO_BROWSER,
        "RTPE_ANSWER_TO_BROWSER": RTPE_ANSWER_TO_BROWSER,
    }


def _tls_cfg(w: WebRtcFront) -> str:
    return (
        "# Written by gateway.kamailio: wss:// for browsers.\n"
        "[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\n"
        f"require_certificate = no\nprivate_key = {w.tls_key}\ncertificate = {w.tls_cert}\n"
    )


def allowed_networks(sources: tuple[str, ...] | list[str]) -> list[str]:
    """`allowed_sources` as CIDRs Kamailio's is_in_subnet takes (`10.1.2.3` -> `10.1.2.3/32`)."""
    if not sources:
        raise ValueError("allowed_sources is empty: no carrier could call in")
    out = []
    for s in sources:
        try:
            out.append(str(ipaddress.ip_network(s.strip(), strict=False)))
        except ValueError as e:
            raise ValueError(f"allowed_sources: {s!r} is not an address or CIDR ({e})") from None
    return out


def render(cfg: KamailioConfig) -> tuple[str, str]:
    """(kamailio.cfg text, dispatcher list text) for `cfg`."""
    dests = _validate(cfg)
    disabled = {normalize_destination(d) for d in cfg.disabled}
    defines = []
    if cfg.flood_limit:
        defines.append("#!define WITH_FLOOD_LIMIT")
    if cfg.max_load:
        defines.append("#!define WITH_MAX_LOAD")
    w = cfg.webrtc
    if w is not None:
        defines.append("#!define WITH_WEBRTC")
        if w.tls_cert:
            defines.append("#!define WITH_WSS")
    values = {
        "DEFINES": "\n".join(defines),
        "ALLOWED_SOURCES": ",".join(allowed_networks(cfg.allowed_sources)),
        "FLOOD_LIMIT": str(cfg.flood_limit),
        "FLOOD_WINDOW": str(cfg.flood_window_s),
        "MAX_LOAD": str(cfg.max_load),
        "MAX_MSG": str(cfg.max_message_bytes),
        "MAX_VIAS": str(cfg.max_vias),
        "DEBUG": str(cfg.log_level),
        "CHILDREN": str(cfg.children),
        "RUN_DIR": str(cfg.runtime_dir),
        "DIALOG_DB": str(cfg.runtime_dir / DIALOG_DB),
        "LISTEN": _listen_lines(cfg),
        "MPATH": cfg.module_path or find_module_path(),
        "RPC_SOCKET": str(cfg.rpc_socket),
        "LIST_FILE": str(cfg.list_path),
        "FR_TIMER": str(cfg.fr_timer_ms),
        "FR_INV_TIMER": str(cfg.fr_inv_timer_ms),
        "FR_OUT_TIMER": str(cfg.out_fr_timer_ms),
        "PING_INTERVAL": str(cfg.ping_interval_s),
        "PROBING_THRESHOLD": str(cfg.probing_threshold),
        "GROUP": str(cfg.group),
        "ALGORITHM": str(cfg.algorithm),
        "RETRY_AFTER": str(cfg.retry_after_s),
        "LAG_HOLD": str(cfg.lag_hold_s),
        **_webrtc_values(cfg),
        "CLOSING_INIT": "\n".join(f"\t$sht(closing=>{d}) = 0;" for d in dests) or "\t$var(c) = 0;",
    }
    text = template_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise ValueError(f"template placeholders not filled: {', '.join(left)}")
    lines = [
        "# Sautikit front: dispatcher destinations (workers), written by gateway.kamailio.",
        "# setid uri flags priority  (flags: 8 probed with OPTIONS, +4 disabled by the node)",
    ]
    for d in dests:
        flags = _FLAG_PROBING | (_FLAG_DISABLED if d in disabled else 0)
        lines.append(f"{cfg.group} {d} {flags} 0")
    return text, "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write(cfg: KamailioConfig) -> Path:
    """Write kamailio.cfg and dispatcher.list into runtime_dir; returns the kamailio.cfg path."""
    cfg_text, list_text = render(cfg)
    cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
    db = cfg.runtime_dir / DIALOG_DB
    db.mkdir(exist_ok=True)
    for name, text in _DBTEXT_TABLES.items():
        if not (db / name).is_file():  # never overwrite dialogs left by the previous run
            (db / name).write_text(text, encoding="utf-8")
    _atomic_write(cfg.list_path, list_text)
    if cfg.webrtc is not None and cfg.webrtc.tls_cert:
        _atomic_write(cfg.runtime_dir / TLS_CFG_NAME, _tls_cfg(cfg.webrtc))
    _atomic_write(cfg.cfg_path, cfg_text)  # holds the front secret: 0600 (_atomic_write)
    return cfg.cfg_path


def _binary(cfg: KamailioConfig) -> str:
    found = find_binary(cfg.binary)
    if found is None:
        raise KamailioError(f"{cfg.binary!r} not found (install the Debian package kamailio)")
    return found


async def check(cfg: KamailioConfig) -> None:
    """Write the files and run `kamailio -c -f FILE`; raise KamailioError with its output."""
    path = write(cfg)
    proc = await asyncio.create_subprocess_exec(
        _binary(cfg),
        "-c",
        "-f",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise KamailioError(f"kamailio -c -f {path} failed ({proc.returncode}):\n{text}")


# --------------------------------------------------------------------------- RPC

_rpc_ids = itertools.count(1)


async def rpc_call(socket_path: Path, method: str, *params: Any, timeout: float = 3.0) -> Any:
    """One JSON-RPC request to Kamailio's jsonrpcs datagram socket; returns `result`."""
    n = next(_rpc_ids)
    client = socket_path.parent / f".rpc-{os.getpid()}-{n % 1000000}.sock"
    payload = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": n})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(FileNotFoundError):
            client.unlink()
        sock.bind(str(client))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendto(sock, payload.encode(), str(socket_path))
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout)
        except (OSError, TimeoutError) as e:
            raise KamailioError(f"RPC {method}: no answer on {socket_path} ({e!r})") from e
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            client.unlink()
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise KamailioError(f"RPC {method}: not JSON: {data[:200]!r}") from e
    if doc.get("error"):
        err = doc["error"]
        raise KamailioError(f"RPC {method}{list(params)}: {err.get('code')} {err.get('message')}")
    return doc.get("result")


async def lagging_workers(socket_path: Path) -> set[str]:
    """The worker URIs a running front skips because their event loop lags: those the node
    reported (htable `lagging`) and those whose own 503 said so (`refused`, expiring)."""
    out: set[str] = set()
    for table in ("lagging", "refused"):
        result = await rpc_call(socket_path, "htable.dump", table)
        for slot in result if isinstance(result, list) else [result]:
            for item in (slot or {}).get("slot") or [] if isinstance(slot, dict) else []:
                if isinstance(item, dict) and item.get("name"):
                    out.add(str(item["name"]))
    return out


def parse_dispatcher_list(result: Any) -> list[dict[str, Any]]:
    """`dispatcher.list` result -> [{group, uri, flags, state, probing, priority}, ...]."""
    out: list[dict[str, Any]] = []
    if not isinstance(result, dict):
        return out
    for rec in result.get("RECORDS") or []:
        s = rec.get("SET", {}) if isinstance(rec, dict) else {}
        targets = s.get("TARGETS") or []
        for t in targets:
            d = t.get("DEST", {}) if isinstance(t, dict) else {}
            flags = str(d.get("FLAGS", ""))
            out.append(
                {
                    "group": s.get("ID"),
                    "uri": d.get("URI"),
                    "flags": flags,
                    "state": _STATES.get(flags[:1], "unknown"),
                    "active": flags[:1] in ("A", "T"),  # trying is still selected
                    "probing": flags[1:2] == "P",
                    "priority": d.get("PRIORITY"),
                }
            )
    return out


async def sip_ping(host: str, port: int, timeout: float = 1.0) -> int | None:
    """Send one OPTIONS over UDP; the reply's status code, or None without an answer."""
    loop = asyncio.get_running_loop()
    target = "127.0.0.1" if _is_wildcard(host) else host.strip("[]")
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect((target, port))
        lhost, lport = sock.getsockname()[:2]
        tag, branch, cid = secrets.token_hex(4), secrets.token_hex(6), secrets.token_hex(8)
        h = _sock_host(target)
        lh = _sock_host(str(lhost))
        msg = (
            f"OPTIONS sip:{h}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {lh}:{lport};branch=z9hG4bK{branch};rport\r\n"
            f"From: <sip:health@{lh}>;tag={tag}\r\n"
            f"To: <sip:{h}:{port}>\r\n"
            f"Call-ID: {cid}@sautikit\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        deadline = loop.time() + timeout
        while True:
            await loop.sock_sendall(sock, msg.encode())
            try:
                data = await asyncio.wait_for(
                    loop.sock_recv(sock, 65535), max(0.05, min(0.5, deadline - loop.time()))
                )
            except TimeoutError:
                if loop.time() >= deadline:
                    return None
                continue
            except OSError:  # ICMP port unreachable: nobody there yet
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(0.05)
                continue
            m = re.match(rb"SIP/2\.0 (\d{3})", data)
            if m and not data.startswith(b"SIP/2.0 1"):
                return int(m.group(1))
    finally:
        sock.close()


# --------------------------------------------------------------------------- the process


_LEVELS = (
    (re.compile(r"\b(EMERGENCY|ALERT|CRITICAL|BUG|ERROR):"), logging.ERROR),
    (re.compile(r"\bWARNING:"), logging.WARNING),
    (re.compile(r"\b(NOTICE|INFO):"), logging.INFO),
    (re.compile(r"\bDEBUG:"), logging.DEBUG),
)


def kamailio_log_level(line: str) -> int:
    for rx, level in _LEVELS:
        if rx.search(line):
            return level
    return logging.INFO


def _stale_pid(pid_path: Path, cfg_path: Path) -> int | None:
    """The pid recorded in `pid_path`, if that process is a Kamailio running `cfg_path`."""
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(cfg_path).encode() in cmdline else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KamailioFront:
    """Kamailio as a child process of the node, with its RPC.

    `start()`/`stop()`; `supervise()` (run it as a task) starts it and restarts it when it dies;
    `set_state()` takes a worker out of or back into rotation; `reload()` re-reads (optionally
    replaces) the destination list; `destinations()` lists them with their state.
    """

    def __init__(
        self,
        cfg: KamailioConfig,
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._cfg = dataclasses.replace(
            cfg,
            destinations=[normalize_destination(d) for d in cfg.destinations],
            disabled=frozenset(normalize_destination(d) for d in cfg.disabled),
        )
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._stopping = False
        self._quiet = False  # Kamailio's shutdown chatter is not an error
        self._lock = asyncio.Lock()  # start/stop/reload, one at a time
        # Workers whose loop lags, as reported (`report_lagging`) and as told to Kamailio.
        self._lag_want: dict[str, bool] = {}
        self._lag_have: dict[str, bool] = {}
        self._lag_task: asyncio.Task[None] | None = None

    # -- state --------------------------------------------------------------------------
    @property
    def cfg(self) -> KamailioConfig:
        return self._cfg

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_tail(self) -> str:
        return "\n".join(self._tail)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Write and check the config, launch Kamailio, wait until RPC and SIP answer."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        if self.running:
            return
        self._stopping = False
        cfg = self._cfg
        await check(cfg)
        await self._kill_stale()
        with contextlib.suppress(FileNotFoundError):
            cfg.rpc_socket.unlink()
        self._tail.clear()
        self._quiet = False
        self._proc = await asyncio.create_subprocess_exec(
            _binary(cfg),
            "-f",
            str(cfg.cfg_path),
            "-DD",
            "-E",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: stop() can reach every child
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        proc = self._proc
        cfg.pid_path.write_text(f"{proc.pid}\n")
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._pump(proc.stderr, None), name="kamailio-stderr"),
            asyncio.create_task(self._pump(proc.stdout, logging.DEBUG), name="kamailio-stdout"),
        ]
        try:
            await self._wait_ready(self.start_timeout)
        except BaseException:
            await self._terminate()
            raise
        self._lag_have.clear()  # a new Kamailio knows of no lagging worker
        self._kick_lagging()
        log.info(
            "kamailio ready (pid %d) on %s:%d, %d destination(s)",
            proc.pid,
            cfg.listen_host,
            cfg.listen_port,
            len(cfg.destinations),
        )

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            if not self.running:
                await asyncio.sleep(0.1)  # let the readers drain its last words
                raise KamailioError(
                    f"kamailio exited with {self.returncode} while starting:\n{self.log_tail()}"
                )
            if self._cfg.rpc_socket.exists():
                try:
                    await rpc_call(self._cfg.rpc_socket, "core.version", timeout=0.5)
                    break
                except KamailioError as e:
                    last = e
            await asyncio.sleep(0.05)
        else:
            raise KamailioError(f"kamailio RPC not answering after {timeout}s: {last}")
        code = await sip_ping(
            self._cfg.listen_host, self._cfg.listen_port, max(0.5, deadline - loop.time())
        )
        if code != 200:
            raise KamailioError(
                f"kamailio not answering OPTIONS on {self._cfg.listen_host}:"
                f"{self._cfg.listen_port} (got {code})\n{self.log_tail()}"
            )

    async def _pump(self, stream: asyncio.StreamReader, level: int | None) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            lvl = kamailio_log_level(line) if level is None else level
            if self._quiet:
                lvl = min(lvl, logging.INFO)
            proc_log.log(lvl, "%s", line)

    async def _kill_stale(self) -> None:
        """A Kamailio left over from a previous run of this front (same cfg file) holds the
        ports: end its process group (it was started in its own session)."""
        pid = _stale_pid(self._cfg.pid_path, self._cfg.cfg_path)
        if pid is None or pid == self.pid:
            return
        log.warning("ending a stale kamailio (pid %d) left by an earlier run", pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if not _alive(pid):
                return
            await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """SIGTERM, wait `stop_timeout`, then SIGKILL its process group."""
        self._stopping = True
        async with self._lock:
            await self._terminate()

    async def _terminate(self) -> None:
        proc = self._proc
        self._quiet = True
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("kamailio (pid %d) ignored SIGTERM; killing it", proc.pid)
        if proc is not None:
            # Children of a killed (or crashed) main process would keep the ports.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for t in self._readers:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(t, 1)
            t.cancel()
        self._readers = []
        with contextlib.suppress(FileNotFoundError):
            self._cfg.pid_path.unlink()

    async def registrations(self) -> int:
        """Browser registrations (contacts) the front holds now."""
        result = await rpc_call(self._cfg.rpc_socket, "stats.get_statistics",
                                "usrloc:", timeout=1.0)
        for item in result if isinstance(result, list) else [result]:
            m = re.search(r"location_contacts\s*=\s*(\d+)", str(item))
            if m:
                return int(m.group(1))
        raise KamailioError(f"stats.get_statistics: no location_contacts in {result!r}")

    async def supervise(self, max_backoff: float = 30.0) -> None:
        """Keep Kamailio running until `stop()` or cancellation (which stops it)."""
        backoff = 0.5
        try:
            while not self._stopping:
                if not self.running:
                    try:
                        await self.start()
                    except (KamailioError, OSError, TimeoutError) as e:
                        log.error("kamailio did not start: %s; retrying in %.1fs", e, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, max_backoff)
                        continue
                proc = self._proc
                assert proc is not None
                started = time.monotonic()
                # Not proc.wait(): that also waits for the pipes, which the children of a
                # crashed main process keep open.
                while proc.returncode is None:  # noqa: ASYNC110 - set by the child watcher
                    await asyncio.sleep(0.2)
                code = proc.returncode
                if self._stopping:
                    return
                async with self._lock:
                    await self._terminate()  # reap children, readers
                self.restarts += 1
                if time.monotonic() - started > 60:
                    backoff = 0.5
                log.error(
                    "kamailio exited with %s; restarting in %.1fs\n%s",
                    code,
                    backoff,
                    self.log_tail(),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
        except asyncio.CancelledError:
            await asyncio.shield(self.stop())
            raise

    # -- RPC ----------------------------------------------------------------------------
    async def rpc(self, method: str, *params: Any, timeout: float = 3.0) -> Any:
        return await rpc_call(self._cfg.rpc_socket, method, *params, timeout=timeout)

    async def set_state(self, uri: str, active: bool) -> None:
        """Take a worker out of rotation (admin-disabled: probes will not bring it back) or put
        it back (active, probed). Calls already on it are not touched. The list file is updated
        too, so a restart or reload keeps the choice."""
        uri = normalize_destination(uri)
        async with self._lock:
            if uri not in self._cfg.destinations:
                raise KamailioError(f"{uri} is not a destination of this front")
            disabled = set(self._cfg.disabled)
            if active:
                disabled.discard(uri)
            else:
                disabled.add(uri)
            self._cfg = dataclasses.replace(self._cfg, disabled=frozenset(disabled))
            _, list_text = render(self._cfg)
            _atomic_write(self._cfg.list_path, list_text)
            if self.running:
                state = "ap" if active else "d"
                await self.rpc("dispatcher.set_state", state, self._cfg.group, uri)

    async def set_lagging(self, uri: str, lagging: bool) -> None:
        """A worker's event loop lags (it refuses new calls) or recovered: the front offers it
        no new call meanwhile. Kept in Kamailio's memory only (a restarted front starts with
        none; a lagging worker's 503 marks it again)."""
        uri = normalize_destination(uri)
        if not self.running:
            return
        if lagging:
            await self.rpc("htable.seti", "lagging", uri, 1)
        else:
            await self.rpc("htable.delete", "lagging", uri)

    def report_lagging(self, uri: str, lagging: bool) -> None:
        """`set_lagging` from sync code (the supervisor's message handler): the latest report
        per worker is applied, in order, by one task; a front not running gets it on start."""
        self._lag_want[normalize_destination(uri)] = lagging
        self._kick_lagging()

    def _kick_lagging(self) -> None:
        if self._lag_task is None or self._lag_task.done():
            self._lag_task = asyncio.get_running_loop().create_task(
                self._apply_lagging(), name="front-lagging"
            )

    async def _apply_lagging(self) -> None:
        while self.running:
            todo = [(u, on) for u, on in self._lag_want.items()
                    if self._lag_have.get(u, False) != on]
            if not todo:
                return
            for uri, on in todo:
                try:
                    await self.set_lagging(uri, on)
                except KamailioError as e:
                    if "not found" not in str(e).lower():  # deleting what is not there is fine
                        log.warning("front: could not mark %s %s: %s", uri,
                                    "lagging" if on else "recovered", e)
                        await asyncio.sleep(0.5)
                        continue
                self._lag_have[uri] = on

    async def lagging(self) -> set[str]:
        """Workers the front skips because their loop lags (set by the node or by their 503)."""
        return await lagging_workers(self._cfg.rpc_socket)

    async def reload(self, destinations: list[str] | None = None) -> None:
        """Rewrite the list (with new `destinations` if given) and `dispatcher.reload`.
        Probe states start over (active); disabled destinations stay disabled."""
        async with self._lock:
            if destinations is not None:
                dests = [normalize_destination(d) for d in destinations]
                self._cfg = dataclasses.replace(
                    self._cfg,
                    destinations=dests,
                    disabled=frozenset(d for d in self._cfg.disabled if d in dests),
                )
            _, list_text = render(self._cfg)
            _atomic_write(self._cfg.list_path, list_text)
            if not self.running:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3.0
            while True:
                try:
                    await self.rpc("dispatcher.reload")
                    return
                except KamailioError as e:
                    # reload_delta: at most one reload a second
                    if "ongoing" not in str(e).lower() or loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.25)

    async def destinations(self) -> list[dict[str, Any]]:
        """The destinations Kamailio has now: uri, group, flags ("AP"...), state, active."""
        try:
            result = await self.rpc("dispatcher.list")
        except KamailioError as e:
            if "no destination sets" in str(e).lower():
                return []
            raise
        return parse_dispatcher_list(result)

    async def dialogs(self, worker: str | None = None) -> list[dict[str, Any]]:
        """Dialogs this front tracks (all, or those of one worker URI): dlg.list records."""
        if worker is None:
            result = await self.rpc("dlg.list")
        else:
            result = await self.rpc("dlg.profile_list", "worker", normalize_destination(worker))
        if isinstance(result, dict):
            result = [result]
        return [d for d in result or [] if isinstance(d, dict)]

    async def end_dialogs(self, worker: str | None = None, reason: str = "") -> int:
        """BYE both ways for every dialog of `worker` (all dialogs when None): the carrier's side
        of calls a dead worker can no longer end. Returns how many were ended."""
        hdrs = f'Reason: SIP;cause=500;text="{reason}"\r\n' if reason else ""
        ended = 0
        for d in await self.dialogs(worker):
            # 4: confirmed (answered), 3: confirmed without ACK yet; earlier states have no BYE.
            if d.get("state") not in (3, 4):
                continue
            params: list[Any] = [int(d["h_entry"]), int(d["h_id"])]
            if hdrs:
                params.append(hdrs)
            try:
                await self.rpc("dlg.end_dlg", *params)
                ended += 1
            except KamailioError as e:
                log.warning("could not end dialog %s: %s", d.get("call-id"), e)
        if ended:
            log.warning("front: ended %d dialog(s) of %s (BYE sent)", ended, worker or "all")
        return ended

    async def counters(self) -> dict[str, int]:
        """The front's refusal counters (script group): source_denied, flood_dropped, ..."""
        result = await self.rpc("cnt.grp_get_all", "script")
        out: dict[str, int] = {}
        for rec in [result] if isinstance(result, dict) else result or []:
            for k, v in (rec or {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    out[k.split(".", 1)[-1]] = int(v)
        return out

    async def ping(self, timeout: float = 1.0) -> bool:
        """Does the front answer an OPTIONS on its listen address?"""
        return await sip_ping(self._cfg.listen_host, self._cfg.listen_port, timeout) == 200


# --------------------------------------------------------------------------- CLI


def config_from_settings(path: Path, out: Path | None) -> KamailioConfig:
    """A KamailioConfig from gateway.toml, with the workers the node would start."""
    from config.settings import load_settings, parse_hostport
    from gateway.plan import plan_node

    s = load_settings(path)
    host, port = parse_hostport(s.sip.listen)
    plan = plan_node(s)
    dests = plan.destinations
    admit = plan.admit
    return KamailioConfig(
        listen_host=host,
        listen_port=port,
        destinations=dests,
        runtime_dir=(out or s.storage.dir / "kamailio").resolve(),
        children=s.kamailio.children,
        ping_interval_s=s.kamailio.ping_interval_s,
        binary=s.kamailio.binary,
        advertise=s.sip.public_address,
        **front_limits(s, admit),
    )


def front_limits(settings: Any, admit: int) -> dict[str, Any]:
    """The KamailioConfig fields that come from `[sip]` and `[kamailio]` (besides addresses):
    who may call in, the flood limit, and the load limit (`admit` calls per worker)."""
    k = settings.kamailio
    return {
        "allowed_sources": tuple(settings.sip.allowed_sources),
        "flood_limit": k.flood_limit,
        "flood_window_s": k.flood_window_s,
        "max_load": admit if k.load_aware else 0,
    }


def front_sent(settings: Any, source: str) -> bool:
    """Is `source` ("host:port" as pjsip reports it) the node's own front (mode managed)?
    The front sends to local workers from loopback (mhomed), else from its listen address or
    this host's address on the workers' network; always from the listen port."""
    from config.settings import parse_hostport

    try:
        host, port = parse_hostport(source)
    except ValueError:
        return False
    lhost, lport = parse_hostport(settings.sip.listen)
    return port == lport and (
        is_loopback_host(host) or host in (lhost, settings.workers.host) or _is_wildcard(lhost)
    )


def source_allowed(settings: Any, source: str) -> bool:
    """May `source` ("host:port") send this worker an INVITE? Behind a managed front only the
    front; with no front (mode off) the addresses in `sip.allowed_sources`; behind an external
    front (another node's) anyone, since its address is not known here."""
    mode = settings.front_mode()
    if mode == "managed":
        return front_sent(settings, source)
    if mode == "off":
        host = source.rsplit(":", 1)[0].strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n) for n in settings.sip.allowed_sources)
    return True


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gateway.kamailio",
        description="The node's SIP front (Kamailio): render its config, talk to it.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write kamailio.cfg and dispatcher.list")
    r.add_argument("--config", type=Path, help="gateway.toml: listen address and workers from it")
    r.add_argument("--listen", type=_parse_listen, help="HOST:PORT carriers send to")
    r.add_argument("--worker", action="append", default=[], help="worker SIP URI (repeat)")
    r.add_argument("--out", type=Path, help="runtime directory for the files (and RPC socket)")
    r.add_argument("--advertise", help="address carriers use, if not the listen address")
    r.add_argument("--children", type=int, help="SIP worker processes per transport (4)")
    r.add_argument("--ping-interval", type=int, help="seconds between OPTIONS probes (5)")
    r.add_argument("--group", type=int, help="dispatcher set id (1)")
    r.add_argument("--fr-timer-ms", type=int, help="first reply from a worker within (2000)")
    r.add_argument("--retry-after", type=int, help="Retry-After of the front's 503 (5)")
    r.add_argument("--binary", help="kamailio executable (kamailio)")
    r.add_argument("--check", action="store_true", help="also run kamailio -c on the result")
    c = sub.add_parser("rpc", help="send one JSON-RPC command to a running front")
    c.add_argument("--out", type=Path, required=True, help="the runtime directory used to render")
    c.add_argument("method", help="e.g. dispatcher.list, dispatcher.set_state, dispatcher.reload")
    c.add_argument("params", nargs="*", help="parameters (integers are sent as numbers)")
    args = p.parse_args(argv)

    if args.cmd == "rpc":
        params: list[Any] = [int(x) if re.fullmatch(r"-?\d+", x) else x for x in args.params]
        try:
            result = asyncio.run(rpc_call(args.out.resolve() / RPC_NAME, args.method, *params))
        except KamailioError as e:
            print(e, file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        return 0

    if args.config is not None:
        cfg = config_from_settings(args.config, args.out)
        if args.listen:
            cfg = dataclasses.replace(cfg, listen_host=args.listen[0], listen_port=args.listen[1])
        if args.worker:
            cfg = dataclasses.replace(cfg, destinations=args.worker)
    else:
        if not args.listen or not args.worker:
            p.error("render needs --config, or --listen and at least one --worker")
        cfg = KamailioConfig(
            listen_host=args.listen[0],
            listen_port=args.listen[1],
            destinations=args.worker,
            runtime_dir=(args.out or Path("kamailio")).resolve(),
        )
    overrides = {
        "children": args.children,
        "ping_interval_s": args.ping_interval,
        "group": args.group,
        "fr_timer_ms": args.fr_timer_ms,
        "retry_after_s": args.retry_after,
        "binary": args.binary,
        "advertise": args.advertise,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    try:
        path = write(cfg)
        if args.check:
            asyncio.run(check(cfg))
    except (ValueError, KamailioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {cfg.list_path} ({len(cfg.destinations)} destination(s))")
    print(f"run:  {find_binary(cfg.binary) or cfg.binary} -f {path} -DD -E")
    return 0


if __name__ == "__main__":
    sys.exit(main())
