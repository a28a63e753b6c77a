"""A phone farm: a process with its own pjsua2 endpoint whose phones send tones and record.

Run as `python -m tests.integration.tonephone_proc '<spec json>'` (tests use
`tests.integration.tonephones.PhoneFarm`). Up to 4 calls per farm (the wheel's compiled limit;
3 inbound while an outbound call is up: the endpoint keeps one slot for refusals).

Spec: {"sip_port": int, "rtp_port": int, "rtp_range": int, "dir": str, "tone": int (the
default tone), "behaviours": {user: behaviour}}.

Control: JSON lines. In on stdin: {"op": "call", "req": n, "uri", "tone", "from_user"?,
"headers"?}, {"op": "hangup", "req", "id"}, {"op": "dtmf", "req", "id", "digits"},
{"op": "stop", "req"}. Out on stdout (fd 1 is kept for these; pjsua's own prints go to
stderr): {"ev": "ready", "sip_port"}, {"ev": "reply", "req", "ok", "id"? | "error"?} and call
events {"ev": "incoming" | "early" | "media" | "answered" | "dtmf" | "disconnected", "id", ...}:
incoming has "user", "request_uri", "from"; early "code"; media "wav", "t0" (time.time() when
its recording started), "tone"; dtmf "digit"; disconnected "code", "reason", "by", "wav".

Every call, in or out, plays its own tone (a steady sine) in a loop to the far end from the
moment it has media (early media included) and records what it receives to its WAV.

As a UAS a farm does what the Request-URI's user says: its entry in `behaviours` first, else
the name itself:
- {"do": "answer", "tone": F, "after": D} or user `answer-F[-D]`: 180, then 200 after D s
  (D 0 or none: 200 at once);
- {"do": "early", "tone": F, "after": D | null} or `early-F[-D]`: 183 with SDP and tone F
  (early media), then 200 after D s (never without D);
- {"do": "ring"} or `ring`: 180 until CANCEL;
- {"do": "busy"} or `busy`: 486 Busy Here;
- {"do": "reject", "code": N} or `reject-N`: final response N;
- any entry may add "hangup_after": S: BYE S s after the answer.
A user starting with "+" (an E.164 number) and no entry answers at once with the default tone;
anything else gets 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pjsua2 as pj

from media.call import CallEnd, CallGone, SipCall
from media.endpoint import EndpointConfig, IncomingInvite, SipEndpoint
from media.tones import Tone, steady

log = logging.getLogger("tonephone")


def behaviour_of(user: str, behaviours: dict[str, dict[str, Any]], default_tone: int
                 ) -> dict[str, Any]:
    """What the farm does with an INVITE to `user` (see the module docstring)."""
    if user in behaviours:
        return behaviours[user]
    parts = user.split("-")
    try:
        if parts[0] == "answer" and len(parts) in (2, 3):
            return {"do": "answer", "tone": int(parts[1]),
                    "after": float(parts[2]) if len(parts) == 3 else 0.0}
        if parts[0] == "early" and len(parts) in (2, 3):
            return {"do": "early", "tone": int(parts[1]),
                    "after": float(parts[2]) if len(parts) == 3 else None}
        if parts[0] == "reject" and len(parts) == 2:
            return {"do": "reject", "code": int(parts[1])}
    except ValueError:
        return {"do": "reject", "code": 404}
    if user in ("ring", "busy"):
        return {"do": user}
    if user.startswith("+"):
        return {"do": "answer", "tone": default_tone, "after": 0.0}
    return {"do": "reject", "code": 404}


def user_of(uri: str) -> str:
    u = uri.strip().strip("<>")
    u = u.split(":", 1)[1] if ":" in u else u
    return u.split("@", 1)[0].split(";", 1)[0]


@dataclass
class Phone:
    id: str
    call: SipCall
    tone_hz: int
    wav: Path
    tone: Tone | None = None
    rec: pj.AudioMediaRecorder | None = None
    am: pj.AudioMedia | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class Farm:
    def __init__(self, spec: dict[str, Any], out: TextIO) -> None:
        self.spec = spec
        self.out = out
        self.dir = Path(spec["dir"])
        self.behaviours: dict[str, dict[str, Any]] = spec.get("behaviours") or {}
        self.default_tone = int(spec.get("tone", 697))
        self.phones: dict[str, Phone] = {}
        self._n = 0
        self.loop = asyncio.get_running_loop()
        self.ep = SipEndpoint(self.loop, EndpointConfig(
            sip_host="127.0.0.1", sip_port=int(spec["sip_port"]), transports=("udp",),
            rtp_port=int(spec["rtp_port"]), rtp_port_range=int(spec.get("rtp_range", 40)),
            max_calls=4))
        self.ep.on_incoming = self._incoming
        self.stopped = asyncio.Event()
        self._finishing: set[asyncio.Future[None]] = set()

    def emit(self, ev: str, **kw: Any) -> None:
        self.out.write(json.dumps({"ev": ev, **kw}) + "\n")
        self.out.flush()

    def _new_id(self) -> str:
        self._n += 1
        return f"c{self._n}"

    # -- phones --------------------------------------------------------------------------
    def _adopt(self, call: SipCall, tone_hz: int) -> Phone:
        pid = self._new_id()
        ph = Phone(pid, call, tone_hz, self.dir / f"{pid}-{os.getpid()}.wav")
        self.phones[pid] = ph
        call.on_media.append(lambda am, ph=ph: self._media(ph, am))
        call.on_early.append(lambda code, ph=ph: self.emit("early", id=ph.id, code=code))
        call.on_answer.append(lambda ph=ph: self.emit("answered", id=ph.id))
        call.on_end.append(lambda end, ph=ph: self._ended(ph, end))
        ph.tasks.append(asyncio.ensure_future(self._digits(ph)))
        return ph

    def _media(self, ph: Phone, am: pj.AudioMedia) -> None:
        if ph.am is not None and ph.am.getPortId() == am.getPortId():
            return
        try:
            if ph.tone is None:
                ph.tone = steady(self.ep.cfg.clock_rate, ph.tone_hz)
            if ph.am is not None:
                with contextlib.suppress(pj.Error):
                    ph.tone.audio_media.stopTransmit(ph.am)
            ph.tone.audio_media.startTransmit(am)
            if ph.rec is None:
                ph.rec = pj.AudioMediaRecorder()
                ph.rec.createRecorder(str(ph.wav))
                am.startTransmit(ph.rec)
                self.emit("media", id=ph.id, wav=str(ph.wav), t0=time.time(), tone=ph.tone_hz)
            else:
                am.startTransmit(ph.rec)
            ph.am = am
        except pj.Error as e:
            log.warning("%s: media: %s", ph.id, e.info())

    async def _digits(self, ph: Phone) -> None:
        with contextlib.suppress(CallGone):
            while True:
                d = await ph.call.next_digit(None)
                if d is not None:
                    self.emit("dtmf", id=ph.id, digit=d)

    def _ended(self, ph: Phone, end: CallEnd) -> None:
        for t in ph.tasks:
            t.cancel()
        self._finishing.add(asyncio.ensure_future(self._finish(ph, end)))

    async def _finish(self, ph: Phone, end: CallEnd) -> None:
        if ph.tone is not None:
            ph.tone.close()
        ph.tone = None
        ph.am = None
        had_rec = ph.rec is not None
        ph.rec = None  # ~AudioMediaRecorder writes the WAV header (on the clock thread)
        if had_rec:
            await _wav_final(ph.wav, 3.0)
        self._finishing.discard(asyncio.current_task())  # type: ignore[arg-type]
        self.emit("disconnected", id=ph.id, code=end.sip_code, reason=end.reason, by=end.by,
                  wav=str(ph.wav) if had_rec else None)

    # -- UAS ------------------------------------------------------------------------------
    def _incoming(self, call: SipCall, invite: IncomingInvite) -> None:
        user = user_of(invite.request_uri)
        b = behaviour_of(user, self.behaviours, self.default_tone)
        ph = self._adopt(call, int(b.get("tone", self.default_tone)))
        self.emit("incoming", id=ph.id, user=user, request_uri=invite.request_uri,
                  **{"from": invite.from_uri})
        ph.tasks.append(asyncio.ensure_future(self._uas(ph, b)))

    async def _uas(self, ph: Phone, b: dict[str, Any]) -> None:
        call = ph.call
        try:
            do = b.get("do", "answer")
            if do == "busy":
                call.reject_now(486)
                return
            if do == "reject":
                call.reject_now(int(b.get("code", 603)))
                return
            if do == "ring":
                call.ringing()
                return
            if do == "early":
                prm = pj.CallOpParam()
                prm.statusCode = 183
                call._check().answer(prm)  # 183 Session Progress with our SDP: early media
                if b.get("after") is None:
                    return
                await call.wait(float(b["after"]))
            else:
                after = float(b.get("after", 0.0))
                if after > 0:
                    call.ringing()
                    await call.wait(after)
            await call.answer()
            if b.get("hangup_after") is not None:
                await call.wait(float(b["hangup_after"]))
                call.reject_now(200)
        except CallGone:
            pass
        except pj.Error as e:
            log.warning("%s: %s", ph.id, e.info())

    # -- commands -------------------------------------------------------------------------
    def command(self, msg: dict[str, Any]) -> None:
        req = msg.get("req")
        op = msg.get("op")
        try:
            if op == "call":
                headers = msg.get("headers") or None
                from_uri = (self.ep.caller_uri(msg["from_user"]) if msg.get("from_user")
                            else None)
                call = self.ep.make_call(msg["uri"], headers, from_uri=from_uri, last_slot=True)
                ph = self._adopt(call, int(msg.get("tone", self.default_tone)))
                self.emit("reply", req=req, ok=True, id=ph.id)
                return
            if op == "stop":
                self.emit("reply", req=req, ok=True)
                self.stopped.set()
                return
            ph = self.phones[msg["id"]]
            if op == "hangup":
                ph.call.reject_now(int(msg.get("code", 603)))
            elif op == "dtmf":
                ph.call.send_dtmf(msg["digits"])
            else:
                raise ValueError(f"unknown op {op!r}")
            self.emit("reply", req=req, ok=True, id=ph.id)
        except Exception as e:
            self.emit("reply", req=req, ok=False, error=f"{type(e).__name__}: {e}")

    async def run(self) -> None:
        self.ep.start()
        self.emit("ready", sip_port=self.ep.cfg.sip_port, pid=os.getpid())
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                          sys.stdin)
        stdin_task = asyncio.ensure_future(self._read(reader))
        await self.stopped.wait()
        stdin_task.cancel()
        live = [ph for ph in self.phones.values() if not ph.call.ended]
        for ph in live:
            ph.call.reject_now(603)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for ph in live:
                    await ph.call.wait_ended()
        await asyncio.sleep(0.3)  # the finals' WAV headers
        self.phones.clear()
        import gc

        gc.collect()
        self.ep.stop()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                self.stopped.set()  # our parent is gone
                return
            with contextlib.suppress(json.JSONDecodeError):
                self.command(json.loads(line))


async def _wav_final(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            head = path.read_bytes()[:8]  # noqa: ASYNC240 (8 bytes of a local file)
            size = path.stat().st_size  # noqa: ASYNC240
            if head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") == size - 8:
                return
        await asyncio.sleep(0.02)


def main() -> None:
    spec = json.loads(sys.argv[1])
    # fd 1 carries the protocol only: keep it, and send everything else (pjlib's first lines,
    # stray prints) to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s tonephone %(levelname)s %(message)s")

    async def go() -> None:
        await Farm(spec, out).run()

    asyncio.run(go())


if __name__ == "__main__":
    main()
