"""A worker process: one pjsua2 endpoint and the calls it holds (at most what pjsua2 allows).

Started by the supervisor (`gateway.node`) with a socketpair for coordination; events go through
the shared SQLite outbox, so a worker that dies loses no event it has written.
usage: python -m gateway.workers.worker --index N --ipc-fd FD --max-calls N [--config FILE]
(its ports come from the node's plan, gateway/plan.py, as the supervisor's do). With
`[workers] start = "fork"` (the default) the supervisor has the fork server
(gateway/forkserver.py) fork it instead, and `run_forked` is its entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal

from aiohttp import ClientSession

import gateway.supervision.tap  # noqa: F401  (registers the supervision ops)
from config.settings import Settings, load_settings, parse_hostport
from dsl.interpreter import Fetch
from gateway.calls.identity import CallIdentity
from gateway.calls.links import LinkSigner
from gateway.calls.outcome import Outcome
from gateway.calls.writer import CallEventWriter
from gateway.control.originate import Destination, events_destination
from gateway.dial.station import DialStation
from gateway.events.outbox import AsyncOutbox
from gateway.kamailio import source_allowed
from gateway.logs import setup_logging
from gateway.plan import NodePlan, loopback_for, plan_node
from gateway.prompts import GatewayPrompts
from gateway.rooms.local import LocalRooms
from gateway.routing import Router, RoutingError, dialled, normalise_e164, set_default_region
from gateway.session import CallSession, TimedVoiceApp, new_call_id
from gateway.streams.fork import CallInfo
from gateway.streams.registry import CallStreams
from gateway.urlguard import check_url, make_session
from gateway.voice_app import VoiceAppClient
from gateway.workers import protocol as p
from gateway.workers.commands import LiveCall, handle_request
from gateway.workers.ipc import Channel, Requester, open_channel
from gateway.workers.lag import LagMeter
from media.call import SipCall
from media.endpoint import EndpointConfig, IncomingInvite, SipEndpoint
from media.prompts import PromptStore
from media.tts.espeak import EspeakTts

log = logging.getLogger(__name__)

LAG_TICK_S = 0.1
# A loop that stays behind [workers] lag_limit_ms (gateway/workers/lag.py) refuses new calls
# until it is back under this for 0.5 s: a loop that lags in bursts does not flap.
LAG_CLEAR_S = 0.1


def uri_user(uri: str) -> str:
    """The user part of a SIP URI or name-addr (`"Bob" <sip:+2547...@host>;tag=x`)."""
    s = uri
    if "<" in s and ">" in s:
        s = s[s.index("<") + 1 : s.index(">")]
    for scheme in ("sips:", "sip:", "tel:"):
        if s.lower().startswith(scheme):
            s = s[len(scheme) :]
            break
    s = s.split(";", 1)[0]
    return s.split("@", 1)[0] if "@" in s else s


def public_host(address: str | None) -> str:
    """The host part of `[sip] public_address` ("203.0.113.10:5060" -> "203.0.113.10")."""
    if not address:
        return ""
    if address.startswith("["):
        return address[1 : address.index("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


_SHUTDOWN_MESSAGES = {
    "supervisor_lost": "the node's supervisor process exited; the worker ended its calls",
    "node_shutdown": "the node was stopped while the call was in progress",
    "outbox_down": "the worker could no longer write events; it ended its calls",
}


class Worker:
    def __init__(
        self, settings: Settings, plan: NodePlan, index: int, channel: Channel[p.ToWorker]
    ) -> None:
        self.settings = settings
        set_default_region(settings.routing.default_region)  # national forms, `dial` included
        self.plan = plan
        self.place = place = plan.workers[index]
        self.index = index
        self.channel = channel
        # what this worker asks the supervisor (legs on other workers, rooms): protocol.Ask
        self.supervisor = Requester(channel, ask=True)
        self.draining = False
        # Why calls still live at shutdown are cut: a stop we were sent, unless the supervisor
        # vanished without one (see _commands).
        self.shutdown_reason = "node_shutdown"
        self.loop = asyncio.get_running_loop()
        storage = settings.storage.dir
        self.recordings_dir = storage / "recordings"
        self.cache_dir = storage / "cache"
        for d in (self.recordings_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        # events are committed on this process's outbox writer thread, never on the loop
        self.outbox = AsyncOutbox(storage / "outbox.sqlite3")
        # Every call this worker holds, inbound or outbound, ringing or answered: what
        # commands from the supervisor reach (gateway/workers/commands.py).
        self.calls: dict[str, LiveCall] = {}
        self.dial = DialStation(self)  # dial legs here, and bridges homed here
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        cb = settings.callbacks
        self.http = make_session(allow_private=cb.allow_private)
        # The control plane is operator config, not untrusted input: no SSRF guard on it.
        self.cp_http = ClientSession()
        self.router = Router(settings, self.cp_http)
        guard = functools.partial(
            check_url, allow_http=cb.allow_http, allow_private=cb.allow_private
        )
        clock = settings.media.clock_rate
        tts_cache = settings.tts.cache_dir or (self.cache_dir / "tts")
        store = PromptStore(
            self.cache_dir,
            clock,
            EspeakTts(tts_cache, default_language=settings.tts.default_language),
            self.http,
            guard,
            max_duration_s=settings.media.max_play_seconds,
            max_decoded_bytes=settings.media.max_play_decoded_mib << 20,
        )
        self.prompts = GatewayPrompts(store, self.cache_dir, clock)
        self.endpoint = SipEndpoint(
            self.loop,
            EndpointConfig(
                sip_host=place.sip_host,
                sip_port=place.sip_port,
                clock_rate=clock,
                rtp_port=place.rtp_port,
                rtp_port_range=place.rtp_ports,
                max_calls=place.max_calls,
                admit=place.admit,
                # Behind a front, SIP reaches workers on their own address; RTP goes straight
                # to them, so the public address (host part) is what SDP advertises.
                public_address=(settings.sip.public_address or "")
                if settings.front_mode() == "off"
                else "",
                media_address=public_host(settings.sip.public_address),
                rtp_host=settings.media.rtp_address or parse_hostport(settings.sip.listen)[0],
                user_agent=settings.sip.user_agent,
                outbound_proxy=plan.outbound_proxy,
                log_file=storage / f"pjsip-worker{index}.log",
                log_level=3 if settings.log.level == "DEBUG" else 1,
            ),
        )
        self.endpoint.on_incoming = self._on_incoming
        # Behind a front only the front; with none, sip.allowed_sources: decided in the pump
        # thread before any media socket opens (a flood from elsewhere costs no queue slot).
        self.endpoint.source_filter = functools.partial(source_allowed, settings)
        self.api_base = settings.api.base_url  # a wildcard listen is reached via loopback
        self.links = LinkSigner.from_storage(storage)
        # The host of outbound calls' From (the caller id's domain): what carriers see.
        self.from_host = public_host(settings.sip.public_address) or loopback_for(
            parse_hostport(settings.sip.listen)[0]
        )
        # this worker's part of conference rooms (the RoomSync op is registered by the import)
        self.rooms = LocalRooms(self.supervisor, self._room_call, clock,
                                link_host=settings.cluster.media_host)
        for trunk in settings.trunks:
            self.endpoint.add_trunk(
                trunk.name,
                username=trunk.username,
                password=trunk.password.get_secret_value() if trunk.password else None,
            )

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.wrap_future(self.outbox.committer.opened)  # raises what opening raised
        self.endpoint.start()
        self.channel.send(
            p.Ready(
                worker=self.index,
                max_calls=self.place.max_calls,
                admit=self.place.admit,
                sip=self.place.sip,
            )
        )
        commands = asyncio.create_task(self._commands())
        lag = asyncio.create_task(self._watch_lag())
        writer = asyncio.wrap_future(self.outbox.committer.done)
        writer.add_done_callback(lambda _: self._outbox_gone())
        await self.stopping.wait()
        self.endpoint.admission.accepting = False
        commands.cancel()
        lag.cancel()
        await self._shutdown()

    def _outbox_gone(self) -> None:
        """The writer thread ended while we run: no event can be stored, so admit nothing and
        exit; the supervisor restarts this worker and writes its calls' finals."""
        if not self.outbox.committer.dead or self.stopping.is_set():
            return
        log.error("outbox writer died; worker %d stops", self.index)
        self.endpoint.admission.accepting = False
        self.shutdown_reason = "outbox_down"
        self.stopping.set()

    async def _commands(self) -> None:
        while (msg := await self.channel.recv()) is not None:
            if isinstance(msg, p.Stop):
                break
            if isinstance(msg, p.Drain):
                self.draining = msg.on
                self.endpoint.admission.accepting = not self.draining
            elif isinstance(msg, p.Request):
                self._spawn(self._request(msg))
            elif isinstance(msg, p.Reply):
                self.supervisor.reply(msg)
        else:
            if not self.stopping.is_set():  # no "stop": the supervisor is gone
                self.shutdown_reason = "supervisor_lost"
        self.supervisor.close()
        self.stopping.set()

    def _room_call(self, call_id: str) -> tuple[SipCall, str] | None:
        live = self.calls.get(call_id)
        call = live.sip_call if live is not None else None
        return (call, live.identity.workspace_id) if live is not None and call else None

    async def _shutdown(self) -> None:
        # Calls cut here are the gateway's doing, never a clean completion (README: "Call
        # endings the gateway caused").
        why = self.shutdown_reason
        for c in list(self.calls.values()):
            c.fail(why, _SHUTDOWN_MESSAGES[why])
            c.cut(503)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        self.rooms.close_all()
        self.endpoint.stop()
        await self.http.close()
        await self.cp_http.close()
        await self.outbox.aclose()  # every event queued is on disk before we exit
        self.channel.close()

    async def _watch_lag(self) -> None:
        """Tell the admission gate when this loop falls behind: new INVITEs then get 503 from
        the pump thread instead of queueing behind the lag, and the supervisor has the front
        offer this worker no call until it has been back under LAG_CLEAR_S for 0.5 s."""
        gate = self.endpoint.admission
        meter = LagMeter(self.settings.workers.lag_limit_ms / 1000, LAG_CLEAR_S)
        while True:
            t0 = self.loop.time()
            await asyncio.sleep(LAG_TICK_S)
            lag = self.loop.time() - t0 - LAG_TICK_S
            if meter.tick(lag):
                overloaded = meter.overloaded
                log.warning("event loop lag %.0f ms: %s new calls", lag * 1000,
                            "refusing" if overloaded else "accepting")
                gate.overloaded = overloaded
                self.channel.send(p.Health(lagging=overloaded, lag_ms=round(lag * 1000, 1)))

    # -- calls ------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _request(self, req: p.Request) -> None:
        reply = await handle_request(self, req)
        self.channel.send(reply)

    def _on_incoming(self, call: SipCall, invite: IncomingInvite) -> None:
        # Admission (capacity, drain, loop lag, socket budget) was decided in the pump thread
        # before pjsua opened any socket (media.admission); counting again here, in calls not
        # yet released, refused calls the gate had counted free. Only a stop or drain that
        # began since then is left to catch.
        if self.stopping.is_set() or self.draining:
            call.reject_now(503, {"Retry-After": "5"})
            return
        self._spawn(self._handle(call, invite))

    def writer(self, identity: CallIdentity, dest: Destination | None) -> CallEventWriter:
        w = self._writer(identity, dest)
        w.on_final_lost = lambda: self._final_lost(identity.call_id)
        return w

    def _final_lost(self, call_id: str) -> None:
        """A call's final cannot be stored: keep the call (no CallEnded) and exit, so that
        the supervisor, seeing this worker gone, writes the call's final (`worker_lost`)."""
        live = self.calls.get(call_id)
        if live is not None:
            live.final_lost = True
        if not self.stopping.is_set():
            log.error("call %s: final not stored; worker %d stops", call_id, self.index)
            self.endpoint.admission.accepting = False
            self.shutdown_reason = "outbox_down"
            self.stopping.set()

    def _writer(self, identity: CallIdentity, dest: Destination | None) -> CallEventWriter:
        return CallEventWriter(
            self.outbox,
            dest,
            identity,
            on_event=self.channel.send,
            recording_url=lambda rid: f"{self.api_base}/v1/recordings/{rid}",
            on_recording=self.channel.send,
            recording_link=lambda rid: self.links.recording_link(self.api_base, rid),
        )

    def voice_app(
        self, fields: dict[str, str], secret: str, body: Any
    ) -> TimedVoiceApp:
        client = VoiceAppClient.from_settings(
            self.http, fields, secret, body, self.settings.callbacks
        )
        return TimedVoiceApp(client, self._observe_fetch)

    def track(self, live: LiveCall) -> None:
        """Register a call for commands and tell the supervisor where it is."""
        self.calls[live.call_id] = live
        self.report(live)

    def report(self, live: LiveCall) -> None:
        if live.session is not None and live.session.dialer is None:
            live.session.dialer = self.dial.dialer(live.session)  # before its documents run
        if live.session is not None and live.session.streams is None:
            live.session.streams = self._streams(live.session)
        writer = live.writer
        self.channel.send(
            p.CallState(
                identity=live.identity.to_wire(), status=live.status,
                answered_at=live.answered_at, trunk=live.trunk,
                events=writer.dest if writer is not None else None,
            )
        )

    def _streams(self, session: CallSession) -> CallStreams:
        """The call's stream forks (gateway/streams/), in this worker: media stays here."""
        ident = session.identity
        info = CallInfo(ident.call_id, ident.from_, ident.to, ident.direction,
                        ident.workspace_id, session.call_fields)
        s = self.settings
        return CallStreams(call=session.call, info=info, app=session.app,
                           post=session.app.post_json, http=self.http,
                           agent_http=self.cp_http,
                           streams=s.streams, agents=s.ai_agents, callbacks=s.callbacks,
                           on_change=self._stream_changed)

    def _stream_changed(self, event: str, detail: str) -> None:
        if event == "open":
            self.channel.send(p.Metric(name=p.STREAM_OPENED, verb=detail))
        else:
            self.channel.send(p.Metric(name=p.STREAM_ENDED, reason=detail))

    def untrack(self, live: LiveCall, outcome: Outcome | None, ended_at: float) -> None:
        """The call is over: out of reach of commands, and its slot (and trunk) free at the
        supervisor. Sent once, as soon as its final event is written."""
        if live.untracked or live.final_lost:
            return  # final_lost: the supervisor writes its final once this worker exits
        live.untracked = True
        self.calls.pop(live.call_id, None)
        self.channel.send(
            p.CallEnded(
                call_id=live.call_id,
                status=outcome.status if outcome else "failed",
                answered_at=live.answered_at,
                ended_at=ended_at,
                sip_code=outcome.sip_code if outcome else None,
                failure_code=outcome.reason if outcome and outcome.status != "completed" else None,
                trunk=live.trunk,
            )
        )

    def final(self, live: LiveCall, outcome: Outcome, ended_at: float) -> None:
        self.channel.send(p.Final(status=outcome.status))
        self.untrack(live, outcome, ended_at)

    def skipped(self, verb: str, reason: str) -> None:
        self.channel.send(p.Metric(name=p.ACTION_SKIPPED, verb=verb, reason=reason))

    async def _handle(self, call: SipCall, invite: IncomingInvite) -> None:
        started_at = time.time()
        to_raw, from_raw = uri_user(invite.request_uri), uri_user(invite.from_uri)
        to, why = dialled(to_raw)
        from_ = normalise_e164(from_raw) or from_raw
        demo = self.router.demo_route(to_raw) if to is None else None
        if to is None and demo is not None:
            to = to_raw  # demo mode: `sip:1234@...` is a call too
        if to is None:
            log.warning(
                "INVITE to %r (from %s, Call-ID %s): not a phone number (%s); 404",
                invite.request_uri,
                from_raw,
                invite.sip_call_id,
                why,
            )
            call.reject_now(404)
            return
        # A browser's call (the front checked its token): it calls from its token's number.
        # (the front sets these from a checked token and removes them from everyone else's
        # requests; without [webrtc] nobody may set them)
        client = invite.headers.get("x-sautikit-client") if self.settings.webrtc.enabled \
            else None
        direction: Literal["inbound", "outbound"] = "inbound"
        if client:
            from_ = invite.headers.get("x-sautikit-client-number", "") or from_
        try:
            route = demo or await self.router.resolve(to, from_)
            if route is None and client:
                # Not one of ours: the client's own number's voice app places it (it is told
                # `direction: outbound`, `to` the dialled number, and `dial`s it).
                route = await self.router.resolve(from_, from_)
                direction = "outbound"
        except RoutingError as e:
            log.error("INVITE to %s: routing failed: %s; 503", to, e)
            # Final: every other worker would ask the same broken control plane.
            call.reject_now(503, {"Retry-After": "5", "X-Sautikit-Final": "routing"})
            return
        if route is None:
            log.warning(
                "INVITE to %s from %s (Call-ID %s): unknown number; 404",
                to,
                from_,
                invite.sip_call_id,
            )
            call.reject_now(404)
            return
        identity = CallIdentity(
            call_id=new_call_id(),
            direction=direction,
            from_=from_,
            to=to,
            number_id=route.number_id,
            workspace_id=route.workspace_id,
            created_at=started_at,
            worker=self.index,
            sip_call_id=invite.sip_call_id,
            client=client or None,
            client_is_caller=bool(client),
        )
        writer = self.writer(
            identity,
            events_destination(
                self.settings.control_plane, route.events_url, route.webhook_secret
            ),
        )
        fields = identity.callback_fields("ringing")
        app = self.voice_app(fields, route.webhook_secret, route.callback_body)
        session = CallSession(
            call=call,
            identity=identity,
            writer=writer,
            app=app,
            call_fields=fields,
            first_document=Fetch(route.voice_callback_url, route.voice_callback_method),
            voice_callback_url=route.voice_callback_url,
            prompts=self.prompts,
            recordings_dir=self.recordings_dir,
            rooms=self.rooms,
        )
        live = LiveCall(identity, session=session)
        session.on_final = lambda outcome, end: self.final(live, outcome, end.ended_at)
        session.on_skip = self.skipped
        session.on_state = lambda: self._answered(live)
        self.track(live)
        try:
            await session.run()
        finally:
            end = call.end
            self.untrack(live, session.outcome, end.ended_at if end else time.time())

    def _answered(self, live: LiveCall) -> None:
        self.report(live)
        call = live.sip_call
        if call is not None and call.answer_sent_at is not None:
            setup = call.answer_sent_at - call.created_at
            self.channel.send(p.Metric(name="setup_seconds", value=setup))

    def _observe_fetch(self, seconds: float, outcome: str) -> None:
        self.channel.send(p.Metric(name="callback_fetch_seconds", value=seconds, outcome=outcome))


async def amain(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gateway.workers.worker")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--ipc-fd", type=int, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--max-calls", type=int, required=True)
    args = ap.parse_args(argv)
    return await serve(load_settings(args.config), args.index, args.ipc_fd, args.max_calls)


async def serve(settings: Settings, index: int, ipc_fd: int, max_calls: int) -> int:
    """Run worker `index` on the IPC socket `ipc_fd` until told to stop (or the supervisor is
    gone). Spawned (`main`) or forked from the fork server (`run_forked`)."""
    setup_logging(settings.log.level, settings.log.json_format, f"worker{index}")
    sock = socket.socket(fileno=ipc_fd)
    channel = await open_channel(sock, p.TO_WORKER)
    plan = plan_node(settings, max_calls=max_calls)
    worker = Worker(settings, plan, index, channel)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    await worker.run()
    return 1 if worker.shutdown_reason == "outbox_down" else 0


def run_forked(settings: Settings, index: int, ipc_fd: int, max_calls: int) -> int:
    """The worker's life in a child of the fork server (gateway/forkserver.py): everything
    that starts threads or an event loop (asyncio, pjsua2's libCreate) happens here, after
    the fork. Returns the exit code."""
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(settings, index, ipc_fd, max_calls))
    return 0


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(amain()))


if __name__ == "__main__":
    main()
