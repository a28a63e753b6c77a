"""How many concurrent calls the installed pjsua2 really allows (PJSUA_MAX_CALLS is compiled in).

`pjsua_init` silently clamps `UaConfig.maxCalls`, so ask for many and count how many calls
`makeCall` accepts before PJ_ETOOMANY, towards a blackhole that never answers. Run in a
subprocess (`python -m media.probe`): one pjsua2 library per process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pjsua2 as pj

CEILING = 1024


def _count() -> int:
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.maxCalls = CEILING
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    ep.libInit(cfg)
    tc = pj.TransportConfig()
    tc.boundAddress = "127.0.0.1"
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
    ep.audDevManager().setNullDev()
    ep.libStart()
    acc = pj.Account()
    ac = pj.AccountConfig()
    ac.idUri = "sip:probe@127.0.0.1"
    acc.create(ac)
    # A bound UDP socket that never reads: INVITEs to it go unanswered.
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    target = f"sip:probe@127.0.0.1:{hole.getsockname()[1]}"
    calls = []
    n = 0
    while n < CEILING:
        call = pj.Call(acc)
        try:
            call.makeCall(target, pj.CallOpParam(True))
        except pj.Error:
            break
        calls.append(call)
        n += 1
    ep.hangupAllCalls()
    calls.clear()
    return n


def probe_max_calls(cache: Path | None = None, timeout: float = 20) -> int:
    """The probed limit, remembered in `cache` (JSON) per pjsua2 build: it only changes when
    the library does."""
    build = _library_stamp()
    if cache is not None:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("build") == build:
                return int(saved["max_calls"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    out = subprocess.run(
        [sys.executable, "-m", "media.probe"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    n = int(out.stdout.strip().splitlines()[-1])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"build": build, "max_calls": n}))
    return n


def _library_stamp() -> str:
    """Path, size and mtime of the compiled pjsua2 module: they change when the build does."""
    lib = Path(pj._pjsua2.__file__)
    st = lib.stat()
    return f"{lib}:{st.st_size}:{int(st.st_mtime)}"


if __name__ == "__main__":
    print(_count(), flush=True)
    sys.stdout.flush()
    import os

    os._exit(0)  # skip libDestroy: the process is done, and teardown of dangling calls is slow
