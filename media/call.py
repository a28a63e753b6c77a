"""A pjsua2 call as an asyncio object: answer, reject, hang up, play, record, DTMF.

Outbound calls (`SipEndpoint.make_call`) report their progress here too: the first ringing
answer (`provisional_code`, `on_early`), the 200 OK (`answered_at`, `answered_mono`), and on
failure the final response's code, reason phrase and Q.850 cause (`CallEnd`). A runner tells
"408 with no ringing first" (the trunk is dead: fail over) from "408 after ringing" (no
answer) by `provisional_code`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pjsua2 as pj

from media import admission
from media.dtmf import DigitDeduper
from media.ports import PooledPort, give_back, pcm_of, take_port

if TYPE_CHECKING:
    from media.endpoint import SipEndpoint

log = logging.getLogger(__name__)


MEDIA_AFTER_ACK_S = 2.0  # how long a confirmed call may wait for the ACK's SDP answer
# How often a recording with a silence timeout reads the caller's level (one timer callback,
# no task): the silence stop is this late at most.
SILENCE_TICK_S = 0.25
VOICE_LEVEL = 2  # a conference port level (0-255) above this is the caller speaking

RecordEnd = Literal["finishOnKey", "maxLength", "silence", "hangup"]


class CallGone(Exception):
    """The call ended (or never had media) while an operation waited on it."""


class CallSetupError(Exception):
    """`make_call` could not send the INVITE (bad URI, unknown trunk, ...): no call exists.

    `status` is the PJSIP status code (0 when the gateway refused before asking PJSIP)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NoCallSlot(CallSetupError):
    """Every pjsua2 call slot of this process is taken (the compiled limit, 4 in the PyPI
    wheel, counts inbound and outbound calls together): place the call on another worker."""


PJ_ETOOMANY = 70010  # PJ_ERRNO_START_STATUS + 10: "too many objects" (here: calls)


_METHODS = {pj.PJSUA_DTMF_METHOD_RFC2833: "rfc4733", pj.PJSUA_DTMF_METHOD_SIP_INFO: "sip_info"}


@dataclass(frozen=True)
class CallEnd:
    # Last status code PJSIP saw: an outbound call's final response (486, 503, 487 after our
    # CANCEL, 408 when nothing answered), 200 after a BYE, an inbound call's final answer.
    sip_code: int
    reason: str  # its reason phrase
    by: Literal["remote", "local"]
    was_answered: bool
    ended_at: float  # time.time()
    # From a `Reason: Q.850;cause=N` header of the message that ended the call (the final
    # response of an outbound call, or the far end's BYE); None when it had none.
    q850_cause: int | None = None


_REASON_Q850 = re.compile(r"(?:^|,)\s*Q\.850\s*;(?:[^,]*?;)?\s*cause\s*=\s*(\d{1,3})", re.I)


def q850_cause(whole_msg: str) -> int | None:
    """The Q.850 cause of a SIP message's Reason header(s) (RFC 3326), if any."""
    if not whole_msg:
        return None
    head = whole_msg.split("\r\n\r\n", 1)[0].replace("\r\n", "\n")
    for line in head.split("\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "reason":
            m = _REASON_Q850.search(value)
            if m:
                return int(m.group(1))
    return None


@dataclass(frozen=True)
class Recording:
    path: Path
    duration_s: float
    ended_by: RecordEnd
    digit: str | None


class _Gone:
    """What a waiter's future is resolved with when the call ends (never an exception: a
    waiter cancelled meanwhile would leave it unretrieved)."""


_GONE = _Gone()


class PjCall(pj.Call):  # type: ignore[misc]
    """pjsua2 callbacks: copy what they say, hand it to asyncio, nothing else."""

    def __init__(
        self, acc: pj.Account, call_id: int = pj.PJSUA_INVALID_ID, counted: bool = False
    ) -> None:
        super().__init__(acc, call_id)
        self.endpoint: SipEndpoint = acc._endpoint
        self.loop = self.endpoint.loop
        self.owner: SipCall | None = None
        self.inbound = call_id != pj.PJSUA_INVALID_ID
        self.counted = counted  # in the endpoint's admission counts until DISCONNECTED
        # SIP Call-ID, copied at the first state change (CALLING fires inside makeCall, so an
        # outbound call has it when makeCall returns, even if it ended at once).
        self.sip_call_id = ""
        self.first_id = call_id  # the pjsua call id (outbound: set at the first state change)
        self.sent_at = 0.0  # time.monotonic() of the INVITE (outbound)
        self.progressed = False  # outbound: past CALLING (a provisional or final answer)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self.loop.call_soon_threadsafe(self._deliver, fn, args)

    def _deliver(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self.owner is not None:
            fn(self.owner, *args)

    def onCallTransferRequest(self, prm: pj.OnCallTransferParam) -> None:
        # A REFER is declined: pjsua would otherwise place a call to its Refer-To itself, a
        # call no voice app asked for (and no one would be billed for). Setting the answer is
        # the callback's whole job, so it is done here, not on the loop.
        prm.statusCode = 603

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        ci = self.getInfo()
        if not self.sip_call_id:
            self.sip_call_id = ci.callIdString
            self.first_id = ci.id
            self.sent_at = time.monotonic()
        msg = ""
        e = prm.e
        if ci.state in (pj.PJSIP_INV_STATE_EARLY, pj.PJSIP_INV_STATE_CONNECTING,
                        pj.PJSIP_INV_STATE_CONFIRMED):
            self.progressed = True
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            if self.counted:
                # Here, not in asyncio: the gate in the pump thread must see the slot free now.
                # Except an outbound INVITE we cancelled before any response (DISCONNECTED by
                # a user event while still CALLING): PJSIP holds its slot until Timer B.
                self.counted = False
                held = None
                if not self.inbound and not self.progressed and e.type == pj.PJSIP_EVENT_USER:
                    held = self.sent_at + admission.TIMER_B_S
                self.endpoint.admission.ended(self.inbound, slot_held_until=held)
            # The message that ended the call (final response, or the far end's BYE), for its
            # Reason header; parsed in asyncio.
            tsx = e.body.tsxState
            if e.type == pj.PJSIP_EVENT_TSX_STATE and tsx.type == pj.PJSIP_EVENT_RX_MSG:
                msg = tsx.src.rdata.wholeMsg
        self._post(
            SipCall._on_state,
            ci.state,
            ci.lastStatusCode,
            ci.lastReason,
            time.time(),
            time.monotonic(),
            msg,
        )

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        ci = self.getInfo()
        active = [
            i
            for i, mi in enumerate(ci.media)
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE
        ]
        self._post(SipCall._on_media, active[0] if active else -1)

    def onDtmfEvent(self, prm: pj.OnDtmfEventParam) -> None:
        # RFC 4733 reports a key per packet; only its end carries the whole duration.
        if int(prm.flags) & _DTMF_IS_END:
            self._post(SipCall._on_dtmf_end, prm.digit, _duration_ms(prm))

    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:
        self._post(SipCall._on_dtmf, prm.digit, _METHODS.get(prm.method, "rfc4733"),
                   _duration_ms(prm))


def _duration_ms(prm: Any) -> int:
    """A digit's duration in ms as PJSIP reports it (RFC 4733: the event's duration; SIP INFO:
    the body's Duration), 0 when unknown (PJSUA_UNKNOWN_DTMF_DURATION is (unsigned)-1)."""
    try:
        d = int(getattr(prm, "duration", 0))
    except (TypeError, ValueError):
        return 0
    return d if 0 < d < 60_000 else 0


_DTMF_IS_END = 1 << 1  # PJMEDIA_STREAM_DTMF_IS_END (not exported by the binding)


class _Player(pj.AudioMediaPlayer):  # type: ignore[misc]
    def __init__(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        super().__init__()
        self._loop = loop
        self._done = done

    def onEof2(self) -> None:
        self._loop.call_soon_threadsafe(_set_done, self._done)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _InbandTap:
    """Owns a pooled port (media/ports.py) while in-band detection runs: the far end's frames
    go to asyncio. Pooled because dropping a Python port right after its stopTransmit races
    the clock thread's callbacks (a segfault, seen with media links)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[bytes], None]) -> None:
        self._loop = loop
        self._sink = sink

    def _on_frame_received(self, frame: pj.MediaFrame) -> None:
        try:
            if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
                self._loop.call_soon_threadsafe(self._sink, pcm_of(frame.buf))
        except Exception:  # never raise into the clock thread (a closed loop at shutdown)
            pass

    def _on_frame_requested(self, frame: pj.MediaFrame) -> None:
        """It only listens: nothing to give the bridge."""


class SipCall:
    """One SIP call. All methods run on the asyncio thread; awaitables raise CallGone."""

    def __init__(
        self, endpoint: SipEndpoint, pj_call: PjCall, direction: Literal["inbound", "outbound"]
    ) -> None:
        self.endpoint = endpoint
        self.loop = endpoint.loop
        self.direction = direction
        self._pj: PjCall | None = pj_call
        pj_call.owner = self
        self.pj_id: int = -1
        if direction == "inbound":
            self.register()
        self.answered_at: float | None = None  # time.time() of CONFIRMED (the 200 OK / ACK)
        self.created_at = time.monotonic()  # INVITE handed to asyncio (inbound) / sent
        self.answer_sent_at: float | None = None  # our 200 OK (inbound)
        # Outbound progress, stamped in the pump thread when PJSIP saw it. `provisional_code`:
        # the first 18x answer (180 Ringing, 183 Session Progress; 100 Trying is not one).
        self.provisional_code: int | None = None
        self.provisional_at: float | None = None  # time.time()
        self.answered_mono: float | None = None  # time.monotonic() of answered_at
        self.invite_sent_at: float | None = None  # time.monotonic() once makeCall returned
        self.first_audio_at: float | None = None  # time.monotonic(): first prompt connected
        self.sip_call_id = ""  # the SIP Call-ID of an outbound call (inbound: the INVITE's)
        self.on_early: list[Callable[[int], None]] = []  # called with the first 18x code
        self.end: CallEnd | None = None
        self._answered = asyncio.Event()
        self._media = asyncio.Event()
        self._ended = asyncio.Event()
        self._hangup_requested = False
        self._am: pj.AudioMedia | None = None
        # DTMF: keys nobody waits for are buffered (type-ahead); a waiting `next_digit` gets
        # the key straight into its future; while a recording runs its sink takes every key.
        self._digits: deque[str] = deque()
        self._key_waiters: deque[asyncio.Future[str | _Gone | None]] = deque()
        self._key_sink: Callable[[str], None] | None = None
        # Futures resolved with _GONE when the call ends (what `_until` waits on beside its
        # awaitable: a plain future, not a task per wait).
        self._end_waiters: set[asyncio.Future[_Gone]] = set()
        self._dedupe = DigitDeduper()
        self._objects: list[Any] = []  # players/recorders/ports alive for PJSIP
        self._inband: PooledPort | None = None
        self._inband_detector: Any = None
        self.telephone_event = True
        self.on_end: list[Callable[[CallEnd], None]] = []
        # (reason, message) when the call ended for want of media (read by the session)
        self.media_failure: tuple[str, str] | None = None
        self.on_answer: list[Callable[[], None]] = []
        # Called with the call's AudioMedia each time PJSIP reports active audio: an outbound
        # leg's 183 with SDP (early media) as well as the answer, and a renegotiation.
        self.on_media: list[Callable[[pj.AudioMedia], None]] = []
        # Called on the asyncio thread with (digit, duration ms; 0 when unknown) for every key
        # the call accepts (RFC 4733, SIP INFO, in-band), before the digit buffer gets it. A
        # listener that raises is logged and skipped: it never breaks the call.
        self.dtmf_listeners: list[Callable[[str, int], None]] = []
        self._rfc_key: str | None = None  # an RFC 4733 key whose end listeners still wait for
        # Ports that hear what the gateway plays to the caller (media.fork's outbound track):
        # every `play` connects its player to each while it plays (add_outbound_tap).
        self._outbound_taps: list[pj.AudioMedia] = []
        self._players: list[pj.AudioMedia] = []  # the players playing now (for taps added late)

    def register(self) -> None:
        """Keep this call (and so its pjsua2 object) alive until DISCONNECTED."""
        assert self._pj is not None
        # getId() turns invalid once PJSIP is done with the call, which for an outbound call
        # can be before makeCall's caller registers it.
        self.pj_id = self._pj.getId()
        if self.pj_id >= 0:
            self.endpoint.calls[self.pj_id] = self
        else:  # over already; its id may be a new call's by now: never displace that one
            self.pj_id = self._pj.first_id
            self.endpoint.calls.setdefault(self.pj_id, self)

    # -- state ------------------------------------------------------------------------------
    @property
    def answered(self) -> bool:
        return self.answered_at is not None

    @property
    def ended(self) -> bool:
        return self.end is not None

    def _on_state(
        self, state: int, code: int, reason: str, wall: float, mono: float, msg: str
    ) -> None:
        if self.end is not None:
            return
        if state == pj.PJSIP_INV_STATE_EARLY and self.provisional_code is None and code > 100:
            self.provisional_code = code
            self.provisional_at = wall
            for cb_early in self.on_early:
                cb_early(code)
        elif state == pj.PJSIP_INV_STATE_CONFIRMED and self.answered_at is None:
            self.answered_at = wall
            self.answered_mono = mono
            self._answered.set()
            for cb in self.on_answer:
                cb()
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.end = CallEnd(
                sip_code=code,
                reason=reason,
                by="local" if self._hangup_requested else "remote",
                was_answered=self.answered_at is not None,
                ended_at=wall,
                q850_cause=q850_cause(msg),
            )
            self._ended.set()
            while self._key_waiters:
                _resolve(self._key_waiters.popleft(), _GONE)
            for waiter in self._end_waiters:
                _resolve(waiter, _GONE)
            self._end_waiters.clear()
            self._detach_inband()
            self._release()
            for cb_end in self.on_end:
                cb_end(self.end)

    def _on_media(self, med_idx: int) -> None:
        if med_idx < 0 or self._pj is None or self.end is not None:
            return
        try:
            self._am = self._pj.getAudioMedia(med_idx)
            si = self._pj.getStreamInfo(med_idx)
            self.telephone_event = si.audRxEventPt not in (-1, 0)
        except pj.Error as e:
            log.warning("call %d: no audio media: %s", self.pj_id, e.info())
            return
        self._media.set()
        for cb in list(self.on_media):
            cb(self._am)

    def _on_dtmf_end(self, digit: str, duration_ms: int) -> None:
        """The end of an RFC 4733 key: its listeners hear it now, with its duration."""
        if self._rfc_key == digit:
            self._rfc_key = None
            self._tell_listeners(digit, duration_ms)

    def _tell_listeners(self, digit: str, duration_ms: int) -> None:
        for listener in list(self.dtmf_listeners):
            try:
                listener(digit, duration_ms)
            except Exception:
                log.exception("call %d: a DTMF listener failed on %r", self.pj_id, digit)

    def _on_dtmf(self, digit: str, method: str, duration_ms: int = 0) -> None:
        if not self._dedupe.accept(digit, method, time.monotonic()):
            return
        if method == "rfc4733":
            # Listeners wait for the key's end (its duration); the buffer takes it now. A
            # key whose end never came is told at the next key.
            if self._rfc_key is not None:
                self._tell_listeners(self._rfc_key, 0)
            self._rfc_key = digit
        else:
            self._tell_listeners(digit, duration_ms)
        if self._key_sink is not None:
            self._key_sink(digit)
            return
        while self._key_waiters:
            waiter = self._key_waiters.popleft()
            if not waiter.done():  # not cancelled or timed out meanwhile
                waiter.set_result(digit)
                return
        self._digits.append(digit)

    def _release(self) -> None:
        """Drop PJSIP objects once the call is over (asyncio thread, so SWIG deletes here)."""
        self._objects.clear()
        self._players = []
        self._outbound_taps = []
        self._am = None
        if self.endpoint.calls.get(self.pj_id) is self:
            del self.endpoint.calls[self.pj_id]
        pj_call, self._pj = self._pj, None
        if pj_call is not None:
            pj_call.owner = None
            # Never deleted here: ~Call acts on the call id, which the pump thread may be giving
            # to a new INVITE right now (SipEndpoint._sweep deletes it safely).
            self.endpoint._bury(pj_call)

    async def wait_ended(self) -> CallEnd:
        await self._ended.wait()
        assert self.end is not None
        return self.end

    def _check(self) -> PjCall:
        if self.end is not None or self._pj is None:
            raise CallGone()
        return self._pj

    async def _until(self, aw: asyncio.Future[Any] | asyncio.Task[Any]) -> Any:
        """Await `aw` unless the call ends first (then CallGone)."""
        await self._first({aw})
        if aw.done():
            return aw.result()
        aw.cancel()
        raise CallGone()

    async def _first(self, aws: set[asyncio.Future[Any]]) -> None:
        """Wait until one of `aws` is done or the call has ended (whichever comes first)."""
        if self.end is not None:
            return
        gone: asyncio.Future[_Gone] = self.loop.create_future()
        self._end_waiters.add(gone)
        try:
            await asyncio.wait({*aws, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._end_waiters.discard(gone)
            gone.cancel()

    # -- call control -----------------------------------------------------------------------
    def ringing(self) -> None:
        pj_call = self._check()
        prm = pj.CallOpParam()
        prm.statusCode = 180
        pj_call.answer(prm)

    async def answer(self) -> None:
        if self.answered_at is not None and self._media.is_set():
            return
        pj_call = self._check()
        if not self.answered and self.direction == "inbound":
            prm = pj.CallOpParam()
            prm.statusCode = 200
            self.answer_sent_at = self.answer_sent_at or time.monotonic()
            try:
                pj_call.answer(prm)
            except pj.Error as e:
                raise CallGone() from RuntimeError(e.info())
        await self._until(asyncio.ensure_future(self._answered.wait()))
        if self._media.is_set():
            return
        # Confirmed without media: a delayed offer (INVITE without SDP) whose answer was due in
        # the ACK. Its media state comes with the ACK; if none came, the ACK had no SDP and the
        # call can never carry audio: end it (BYE) and say why, rather than wait forever.
        media = asyncio.ensure_future(self._media.wait())
        try:
            await asyncio.wait_for(self._until(media), MEDIA_AFTER_ACK_S)
        except TimeoutError:
            self.media_failure = (
                "sdp_missing",
                "the INVITE had no SDP offer and the ACK no SDP answer to ours: no media",
            )
            log.warning("call %d: %s; hanging up", self.pj_id, self.media_failure[1])
            self.reject_now(200)
            raise CallGone() from None

    def reject_now(self, sip_code: int, headers: dict[str, str] | None = None) -> None:
        """End the call now, whatever its state; idempotent. Answered: BYE. Unanswered
        inbound: `sip_code` is the final response. Unanswered outbound: CANCEL (`sip_code` is
        not sent; the far end answers the INVITE 487, which becomes `CallEnd.sip_code`). Before
        any 18x (nothing, or only a proxy's 100 Trying) PJSIP reports the call DISCONNECTED
        (487, by "local") at once, but keeps the INVITE transaction and its call slot until a
        final answer or Timer B (32 s); the admission gate counts the slot as taken until then
        (media.admission.TIMER_B_S). With no response at all the CANCEL itself waits for one
        (RFC 3261 9.1)."""
        if self._pj is None or self.end is not None:
            return
        self._hangup_requested = True
        prm = pj.CallOpParam()
        prm.statusCode = sip_code
        for name, value in (headers or {}).items():
            h = pj.SipHeader()
            h.hName = name
            h.hValue = value
            prm.txOption.headers.append(h)
        try:
            self._pj.hangup(prm)
        except pj.Error as e:
            log.debug("call %d hangup: %s", self.pj_id, e.info())

    async def reject(self, sip_code: int, headers: dict[str, str] | None = None) -> None:
        self.reject_now(sip_code, headers)
        await self.wait_ended()

    async def hangup(self, sip_code: int = 603) -> None:
        """`reject_now` (BYE, final response, or CANCEL of a ringing outbound call), then wait
        up to 5 s for the end."""
        self.reject_now(sip_code)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._ended.wait()

    async def cancel(self, timeout: float = 5.0) -> CallEnd | None:
        """CANCEL an unanswered outbound call (BYE if it was answered meanwhile) and wait up to
        `timeout` for its end: 487 normally, 200 if the 200 OK crossed the CANCEL (PJSIP then
        ACKs and BYEs). None if it has not ended by then."""
        self.reject_now(487)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        return self.end

    # -- media ------------------------------------------------------------------------------
    @property
    def has_media(self) -> bool:
        return self._am is not None and self.end is None

    def audio_media(self) -> pj.AudioMedia:
        """The call's conference port (what a MixGraph connects); CallGone when it has none
        (not yet negotiated, or the call ended)."""
        return self._audio()

    async def wait_media(self) -> pj.AudioMedia:
        """The call's AudioMedia once PJSIP has it: early (an outbound leg's 183 with SDP) or
        at answer; CallGone if the call ends first. Does not answer an inbound call."""
        if not self._media.is_set():
            self._check()
            await self._until(asyncio.ensure_future(self._media.wait()))
        return self._audio()

    def _audio(self) -> pj.AudioMedia:
        self._check()
        if self._am is None:
            raise CallGone()
        return self._am

    def add_outbound_tap(self, port: pj.AudioMedia) -> None:
        """Let `port` hear every prompt `play` sends the caller from now on (and any playing
        now) until `remove_outbound_tap`. Bridged dial/room audio and tone ports are not
        included (they are MixGraph edges)."""
        if any(t is port for t in self._outbound_taps):
            return
        self._outbound_taps.append(port)
        for player in self._players:
            with contextlib.suppress(pj.Error):
                player.startTransmit(port)

    def remove_outbound_tap(self, port: pj.AudioMedia) -> None:
        """Stop feeding `port` (idempotent); players playing now are disconnected from it."""
        kept = [t for t in self._outbound_taps if t is not port]
        if len(kept) == len(self._outbound_taps):
            return
        self._outbound_taps = kept
        for player in self._players:
            with contextlib.suppress(pj.Error):
                player.stopTransmit(port)

    async def play(self, wav: Path, *, stop: asyncio.Event | None = None) -> bool:
        await self.answer()
        am = self._audio()
        done: asyncio.Future[None] = self.loop.create_future()
        player = _Player(self.loop, done)
        player.createPlayer(str(wav), pj.PJMEDIA_FILE_NO_LOOP)
        self._objects.append(player)
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            try:
                player.startTransmit(am)
            except pj.Error as e:
                # PJSIP ended the call a moment ago (its DISCONNECTED is still on its way to
                # this loop): its media is gone, and so is the call for this play.
                if self._pj is None or not self._pj.isActive():
                    raise CallGone() from RuntimeError(e.info())
                raise
            self._players.append(player)
            for tap in list(self._outbound_taps):
                with contextlib.suppress(pj.Error):
                    player.startTransmit(tap)
            if self.first_audio_at is None:
                # Its first frame leaves on the bridge's next 20 ms tick (the benchmark's
                # "answer -> first RTP of the prompt" ends within a frame of this).
                self.first_audio_at = time.monotonic()
            await self._first({done} if stopper is None else {done, stopper})
            if done.done():
                return True
            if stopper is not None and stopper.done():
                return False
            raise CallGone()
        finally:
            if stopper is not None:
                stopper.cancel()
            if self._am is not None:
                with contextlib.suppress(pj.Error):
                    player.stopTransmit(self._am)
            if any(p is player for p in self._players):
                self._players = [p for p in self._players if p is not player]
                for tap in self._outbound_taps:
                    with contextlib.suppress(pj.Error):
                        player.stopTransmit(tap)
            with contextlib.suppress(ValueError):
                self._objects.remove(player)

    async def wait(self, seconds: float) -> None:
        await self._until(asyncio.ensure_future(asyncio.sleep(seconds)))

    # -- DTMF -------------------------------------------------------------------------------
    def next_digit_nowait(self) -> str | None:
        return self._digits.popleft() if self._digits else None

    async def next_digit(self, timeout: float | None) -> str | None:
        """The next key, None after `timeout` seconds without one; CallGone if the call ends.
        One future per wait: the key, the timer and the hangup each resolve it."""
        if (d := self.next_digit_nowait()) is not None:
            return d
        self._check()
        waiter: asyncio.Future[str | _Gone | None] = self.loop.create_future()
        self._key_waiters.append(waiter)
        timer = None if timeout is None else self.loop.call_later(timeout, _resolve, waiter, None)
        try:
            got = await waiter
        except asyncio.CancelledError:
            # Cancelled after a key landed but before this task resumed: keep the key.
            if waiter.done() and not waiter.cancelled() and isinstance(waiter.result(), str):
                self._digits.appendleft(waiter.result())  # type: ignore[arg-type]
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done():
                waiter.cancel()
        if isinstance(got, _Gone):
            raise CallGone()
        return got

    def send_dtmf(self, digits: str, method: Literal["rfc4733", "sip_info"] = "rfc4733") -> None:
        """Send DTMF to the far end (RFC 4733 events or SIP INFO `application/dtmf-relay`)."""
        pj_call = self._check()
        prm = pj.CallSendDtmfParam()
        prm.digits = digits
        prm.method = (
            pj.PJSUA_DTMF_METHOD_SIP_INFO if method == "sip_info" else pj.PJSUA_DTMF_METHOD_RFC2833
        )
        pj_call.sendDtmf(prm)

    def flush_digits(self) -> None:
        self._digits.clear()

    def listen_for_digits(self, on: bool) -> None:
        """In-band detection only when the far end did not negotiate telephone-event."""
        if on and not self.telephone_event and self._inband is None and self._am is not None:
            from media.dtmf_inband import InbandDtmfDetector

            rate = self.endpoint.cfg.clock_rate
            self._inband_detector = InbandDtmfDetector(rate)
            port = take_port(rate, "dtmf")
            port.owner = _InbandTap(self.loop, self._feed_inband)
            self._inband = port
            self._am.startTransmit(port)
        elif not on:
            self._detach_inband()

    def _feed_inband(self, pcm: bytes) -> None:
        if self._inband_detector is None:
            return
        for d in self._inband_detector.feed(pcm):
            self._on_dtmf(d, "inband")

    def _detach_inband(self) -> None:
        port, self._inband = self._inband, None
        self._inband_detector = None
        if port is not None:
            give_back(port, self.endpoint.cfg.clock_rate)  # every connection stopped first

    # -- recording --------------------------------------------------------------------------
    async def record(
        self,
        dest: Path,
        *,
        max_length_s: float,
        silence_timeout_s: float,
        finish_on_key: str,
        beep: Path | None,
    ) -> Recording:
        """Record the far end into `dest` (atomically). A hangup ends it and keeps the file.

        It waits on one future, resolved by whichever comes first: a key in `finish_on_key`
        (other keys are dropped), the `max_length_s` timer, the call's end, or, only when
        `silence_timeout_s` > 0, a timer reading the caller's level every SILENCE_TICK_S."""
        if beep is not None:
            await self.play(beep)
        am = self._audio()
        tmp = dest.with_name(f".{dest.stem}.part.wav")  # PJSIP picks the format by extension
        rec = pj.AudioMediaRecorder()
        rec.createRecorder(str(tmp))
        self._objects.append(rec)
        am.startTransmit(rec)
        loop = self.loop
        stop: asyncio.Future[tuple[RecordEnd, str | None]] = loop.create_future()

        def finish(ended_by: RecordEnd, digit: str | None = None) -> None:
            if not stop.done():
                stop.set_result((ended_by, digit))

        def key(digit: str) -> None:
            if finish_on_key and digit in finish_on_key:
                finish("finishOnKey", digit)

        def hung_up(_end: CallEnd) -> None:
            finish("hangup")

        last_voice = loop.time()
        ticker: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal last_voice, ticker
            now = loop.time()
            # The call's conference port *transmits* what the caller sends into the bridge:
            # its Tx level is the caller's voice (Rx is what we play to them).
            with contextlib.suppress(pj.Error):
                if self._am is not None and self._am.getTxLevel() > VOICE_LEVEL:
                    last_voice = now
            if now - last_voice >= silence_timeout_s:
                finish("silence")
            else:
                ticker = loop.call_later(SILENCE_TICK_S, tick)

        while not stop.done() and (d := self.next_digit_nowait()) is not None:
            key(d)  # keys buffered before it started (the verb flushes them first)
        self._key_sink = key
        self.on_end.append(hung_up)
        limit = loop.call_later(max_length_s, finish, "maxLength")
        if silence_timeout_s > 0:
            ticker = loop.call_later(SILENCE_TICK_S, tick)
        if self.ended:
            finish("hangup")
        try:
            ended_by, digit = await stop
        finally:
            limit.cancel()
            if ticker is not None:
                ticker.cancel()
            self._key_sink = None
            with contextlib.suppress(ValueError):
                self.on_end.remove(hung_up)
            if self._am is not None:
                with contextlib.suppress(pj.Error):
                    self._am.stopTransmit(rec)
            with contextlib.suppress(ValueError):
                self._objects.remove(rec)
            del rec
        # PJSIP removes the port on its clock thread and writes the WAV header then: wait for it
        # so the file that appears under `dest` is complete.
        await _wav_finalised(tmp, timeout=3.0)
        duration = _wav_duration(tmp)
        os.replace(tmp, dest)
        return Recording(dest, duration, ended_by, digit)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


async def _wav_finalised(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with path.open("rb") as f:
                head = f.read(8)
            size = path.stat().st_size  # noqa: ASYNC240 (a stat of a local file)
            if head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") == size - 8:
                return True
        except OSError:
            pass
        await asyncio.sleep(0.02)
    log.warning("recording %s: header not finalised after %.1fs", path, timeout)
    return False


def _wav_duration(path: Path) -> float:
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (wave.Error, EOFError, OSError):
        return 0.0
