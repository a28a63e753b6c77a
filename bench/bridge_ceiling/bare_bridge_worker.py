"""Bare pjsua2 B2BUA worker: 4 calls = 2 bridged pairs, one conference bridge. No DSL, no HTTP.

Per inbound call: answer it (200), place an outbound call to CALLEE through the front
(`sip:CALLEE@FRONT`), and once both legs have active audio connect them in the bridge both
ways (startTransmit each way). Either side's disconnect hangs up the other. A third inbound
call while two pairs are up is answered 503 (the front fails over to the next worker), so a
worker never needs more than its 4 call slots.

The floor of per-pair cost with this SIP stack: the gateway's bridged calls are judged as a
ratio against a pool of these, measured in the same run (bench/bridges.py).

usage: python bare_bridge_worker.py SIP_PORT RTP_PORT RTP_RANGE CLOCK_RATE FRONT CALLEE
  FRONT = host:port of the front (Kamailio), CALLEE = the user part dialled (e.g. +254711000001)
On SIGTERM it prints one line of counters (JSON) to stdout and exits.
"""

import json
import os
import signal
import sys
from collections import Counter

import pjsua2 as pj

sip_port, rtp_port, rtp_range, clock = (int(a) for a in sys.argv[1:5])
front, callee = sys.argv[5], sys.argv[6]
MAX_PAIRS = 2

ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.uaConfig.threadCnt = 0
cfg.uaConfig.mainThreadOnly = True
cfg.uaConfig.maxCalls = 2 * MAX_PAIRS
cfg.logConfig.level = int(os.environ.get("BARE_LOG_LEVEL", "0"))  # debugging: 5, on stderr
cfg.logConfig.consoleLevel = cfg.logConfig.level
cfg.medConfig.clockRate = clock
cfg.medConfig.sndClockRate = clock
cfg.medConfig.noVad = True
ep.libInit(cfg)
tc = pj.TransportConfig()
tc.port = sip_port
tc.boundAddress = "127.0.0.1"
ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
ep.audDevManager().setNullDev()
ep.libStart()

counts: Counter[str] = Counter()
pairs: list["Pair"] = []
# Work deferred out of pjsua2 callbacks (hangups, dropping references), run by the main loop.
todo: list[tuple["Pair", str]] = []


class Leg(pj.Call):
    def __init__(
        self, acc: pj.Account, pair: "Pair", role: str, call_id: int = pj.PJSUA_INVALID_ID
    ):
        super().__init__(acc, call_id)
        self.pair, self.role = pair, role
        self.audio: pj.AudioMedia | None = None
        self.ended = False

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        ci = self.getInfo()
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.ended = True
            if self.role == "callee" and ci.lastStatusCode // 100 != 2 and not self.pair.bridged:
                counts[f"callee_failed_{ci.lastStatusCode}"] += 1
            todo.append((self.pair, "ended"))

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                self.audio = self.getAudioMedia(i)
                todo.append((self.pair, "media"))
                return


class Pair:
    def __init__(self) -> None:
        self.caller: Leg | None = None
        self.callee: Leg | None = None
        self.bridged = False
        self.hung_up = False
        self.caller_sip_id = ""

    def step(self, what: str) -> None:
        a, b = self.caller, self.callee
        if what == "dial":
            self.callee = Leg(acc, self, "callee")
            op = pj.CallOpParam(True)
            # Names the caller's leg, so the benchmark pairs the two legs exactly.
            h = pj.SipHeader()
            h.hName, h.hValue = "X-Bench-Parent", self.caller_sip_id
            op.txOption.headers.append(h)
            try:
                self.callee.makeCall(f"sip:{callee}@{front}", op)
                counts["dialled"] += 1
            except pj.Error:
                counts["dial_error"] += 1
                self.callee.ended = True
                self.step("ended")
        elif what == "media":
            if not self.bridged and a and b and a.audio is not None and b.audio is not None:
                a.audio.startTransmit(b.audio)
                b.audio.startTransmit(a.audio)
                self.bridged = True
                counts["bridged"] += 1
        elif what == "ended":
            if not self.hung_up:
                self.hung_up = True
                for leg in (a, b):
                    if leg is not None and not leg.ended:
                        try:
                            leg.hangup(pj.CallOpParam(True))
                        except pj.Error:
                            counts["hangup_error"] += 1
            if all(leg is None or leg.ended for leg in (a, b)) and self in pairs:
                pairs.remove(self)  # both legs done: PJSIP no longer needs the objects
                counts["pairs_done"] += 1


class Refused(pj.Call):
    """An inbound call answered 503: kept referenced until PJSIP has disconnected it."""

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            gone.append(self)


class Account(pj.Account):
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        op = pj.CallOpParam()
        if len(pairs) >= MAX_PAIRS:
            call = Refused(self, prm.callId)
            refused.add(call)
            op.statusCode = 503
            call.answer(op)  # the front tries the next worker
            counts["refused_503"] += 1
            return
        pair = Pair()
        pairs.append(pair)
        pair.caller = Leg(self, pair, "caller", prm.callId)
        pair.caller_sip_id = pair.caller.getInfo().callIdString
        op.statusCode = 200
        pair.caller.answer(op)
        counts["answered"] += 1
        todo.append((pair, "dial"))


refused: set[Refused] = set()
gone: list[Refused] = []  # disconnected refusals, dropped by the main loop
acc = Account()
ac = pj.AccountConfig()
ac.idUri = f"sip:bare@127.0.0.1:{sip_port}"
ac.mediaConfig.transportConfig.port = rtp_port
ac.mediaConfig.transportConfig.portRange = rtp_range
acc.create(ac)

running = True


def stop(*_: object) -> None:
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
while running:
    ep.libHandleEvents(10)
    while todo:
        p, what = todo.pop(0)
        p.step(what)
    while gone:
        refused.discard(gone.pop())
counts["pairs_left"] = len(pairs)
print(json.dumps({"port": sip_port, **counts}), flush=True)
pairs.clear()
ep.libDestroy()
