"""The pjsua2 endpoint of one process and the thread that pumps its events.

House rules (see shared/design/pjsua2.md):
- the asyncio thread creates the library and makes all API calls; a dedicated pump thread,
  registered with `libRegisterThread`, loops `libHandleEvents`;
- every pjsua2 callback hands its result to asyncio with `loop.call_soon_threadsafe` and does
  nothing else;
- Python references to every `Call`, player, recorder and port are kept until PJSIP is done.

Outbound calls leave through a trunk (`add_trunk`): a trunk with digest credentials has its own
pjsua2 account (answers 401/407 challenges on INVITE with them), the others share one outbound
account. Every outbound account sends through `EndpointConfig.outbound_proxy` when set (the
node's Kamailio front: carriers see one address, and its record-route keeps in-dialog requests
on this process). pjsua2 allows 8 accounts per process (PJSUA_MAX_ACC, compiled in): inbound,
refusals and the shared outbound account take 3, leaving 5 for trunks with credentials.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pjsua2 as pj

from media.admission import Admission

if TYPE_CHECKING:
    from media.call import SipCall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointConfig:
    sip_host: str
    sip_port: int
    clock_rate: int = 8000
    rtp_port: int = 30000
    rtp_port_range: int = 40
    max_calls: int = 4
    admit: int = 0  # inbound calls admitted (0: max_calls); the rest is kept for dial legs
    public_address: str = ""  # SIP (Contact/Via) address when it differs from sip_host
    media_address: str = ""  # address put in SDP for RTP (NAT), when it differs
    rtp_host: str = ""  # RTP bind address; default sip_host
    user_agent: str = "Sautikit-Gateway"
    transports: tuple[str, ...] = ("udp", "tcp")
    # Outbound calls go through this proxy (a loose-routing SIP URI, e.g. the node's Kamailio
    # front "sip:127.0.0.1:5060;lr"); empty: straight to the Request-URI (the trunk).
    outbound_proxy: str = ""
    log_file: Path | None = None
    log_level: int = 1


@dataclass(frozen=True)
class IncomingInvite:
    """What the gateway needs from an INVITE, copied out of pjsua2 in its callback."""

    request_uri: str
    from_uri: str
    to_uri: str
    sip_call_id: str
    source: str
    headers: dict[str, str]


def parse_invite(whole_msg: str) -> tuple[str, dict[str, str]]:
    """Request-URI and headers (last value wins, lower-case names) of a raw SIP request."""
    head = whole_msg.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    lines = head.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    request_uri = parts[1] if len(parts) >= 3 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return request_uri, headers


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, endpoint: SipEndpoint) -> None:
        super().__init__()
        self._endpoint = endpoint

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        # The Call object must exist now so PJSIP has a handler; everything else is asyncio's.
        self._endpoint._incoming_from_pjsip(
            self, prm.callId, prm.rdata.wholeMsg, prm.rdata.srcAddress
        )


MAX_ACCOUNTS = 8  # PJSUA_MAX_ACC of the wheel (compiled in, not reachable from Python)
FIXED_ACCOUNTS = 3  # inbound, refusals, shared outbound


class TooManyTrunkAccounts(ValueError):
    """More trunks with credentials than pjsua2 has accounts left (MAX_ACCOUNTS - 3)."""


@dataclass(frozen=True)
class _Trunk:
    name: str
    username: str | None
    password: str | None = field(repr=False)


class _RefuseAccount(pj.Account):  # type: ignore[misc]
    """Where the gate sends INVITEs it refuses: a loop media transport (no socket), and a 503
    from the pump thread itself, so a refusal costs neither a queue slot nor asyncio time."""

    def __init__(self, endpoint: SipEndpoint) -> None:
        super().__init__()
        self._endpoint = endpoint

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        # A deliberate exception to "callbacks only hand off": refusing here is what keeps a
        # burst from piling calls (and their pjsua slots) up behind a busy asyncio loop.
        call = pj.Call(self, prm.callId)
        op = pj.CallOpParam()
        op.statusCode = self._endpoint._refuse_code  # set by _select_account, same thread
        if op.statusCode == 503:
            # Why (full, overloaded, draining, sockets): a front skips an overloaded worker.
            for name, value in (("Retry-After", "5"),
                                ("X-Sautikit-Refused", self._endpoint._refuse_reason)):
                h = pj.SipHeader()
                h.hName = name
                h.hValue = value
                op.txOption.headers.append(h)
        try:
            # answer(), not hangup(): inside onIncomingCall no response has been sent yet, and
            # pjsua then defers a hangup and drops its headers (seen: the 503 went out without
            # Retry-After). A final answer keeps them.
            call.answer(op)
        except pj.Error:
            try:
                call.hangup(op)
            except pj.Error:
                pass
        self._endpoint._bury(call)


class _Ep(pj.Endpoint):  # type: ignore[misc]
    def __init__(self, endpoint: SipEndpoint) -> None:
        super().__init__()
        self._endpoint = endpoint

    def onSelectAccount(self, prm: pj.OnSelectAccountParam) -> None:
        self._endpoint._select_account(prm)

    def onRejectedIncomingCall(self, prm: pj.OnRejectedIncomingCallParam) -> None:
        self._endpoint._rejected_incoming()


class SipEndpoint:
    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: EndpointConfig) -> None:
        self.loop = loop
        self.cfg = cfg
        self.ep = _Ep(self)
        self._account: _Account | None = None
        self._refuser: _RefuseAccount | None = None
        self._outbound: _Account | None = None  # outbound calls of trunks without credentials
        self._trunks: dict[str, _Trunk] = {}
        self._trunk_accounts: dict[str, _Account] = {}  # trunks with credentials
        self._proxy = cfg.outbound_proxy
        self._refuse_code = 503
        self._refuse_reason = ""
        # Who may send this endpoint an INVITE ("host:port" -> bool); pump thread, so it must be
        # pure and quick. Refused sources get 403 before pjsua opens a socket for them.
        self.source_filter: Callable[[str], bool] | None = None
        self.admission = Admission(
            cfg.admit or cfg.max_calls, max_calls=cfg.max_calls, fixed=len(cfg.transports)
        )
        self._pending_media = False  # the last INVITE sent to the main account (pump thread)
        # pjsua2 Call objects whose calls are over, deleted by the pump thread once nothing
        # else holds them and their call id is not someone else's (see _sweep).
        self._graveyard: list[pj.Call] = []
        self._slot_lock = threading.Lock()
        self._grave_lock = threading.Lock()
        self._pump: threading.Thread | None = None
        self._running = False
        self.calls: dict[int, SipCall] = {}  # pjsua call id -> call; the strong references
        self.on_incoming: Callable[[SipCall, IncomingInvite], None] | None = None

    # -- lifecycle (asyncio thread) --------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        self.ep.libCreate()
        ec = pj.EpConfig()
        ec.uaConfig.threadCnt = 0
        # Not mainThreadOnly: its queued callbacks (DTMF among them) only run when the thread that
        # called libCreate polls, and ours is the pump thread. Callbacks hand off to asyncio anyway.
        ec.uaConfig.mainThreadOnly = False
        ec.uaConfig.maxCalls = cfg.max_calls
        ec.uaConfig.userAgent = cfg.user_agent
        ec.logConfig.consoleLevel = 0
        ec.logConfig.level = cfg.log_level if cfg.log_file else 0
        if cfg.log_file:
            ec.logConfig.filename = str(cfg.log_file)
        mc = ec.medConfig
        mc.clockRate = cfg.clock_rate
        mc.sndClockRate = cfg.clock_rate
        mc.noVad = True
        mc.ecTailLen = 0  # no echo canceller: there is no sound device to echo
        mc.sndAutoCloseTime = -1  # keep the null device's clock running (queued ops wait otherwise)
        mc.threadCnt = 1
        self.ep.libInit(ec)
        tc = pj.TransportConfig()
        tc.port = cfg.sip_port
        tc.boundAddress = cfg.sip_host
        if cfg.public_address:
            tc.publicAddress = cfg.public_address
        for kind in cfg.transports:
            ttype = pj.PJSIP_TRANSPORT_UDP if kind == "udp" else pj.PJSIP_TRANSPORT_TCP
            self.ep.transportCreate(ttype, tc)
        self.ep.audDevManager().setNullDev()
        self._set_codecs()
        self.ep.libStart()
        self._account = _Account(self)
        self._account.create(self._account_config(), True)
        ref_cfg = pj.AccountConfig()
        ref_cfg.idUri = f"sip:refuse@{cfg.public_address or cfg.sip_host}:{cfg.sip_port}"
        ref_cfg.mediaConfig.useLoopMedTp = True
        self._refuser = _RefuseAccount(self)
        self._refuser.create(ref_cfg, False)
        self._outbound = _Account(self)
        self._outbound.create(self._account_config(outbound=True), False)
        for trunk in self._trunks.values():
            if trunk.username is not None:
                self._create_trunk_account(trunk)
        self._running = True
        self._pump = threading.Thread(target=self._pump_events, name="pjsua-pump", daemon=True)
        self._pump.start()
        log.info(
            "SIP endpoint on %s:%d (%s), RTP %d-%d, %d Hz bridge",
            cfg.sip_host,
            cfg.sip_port,
            "+".join(cfg.transports),
            cfg.rtp_port,
            cfg.rtp_port + cfg.rtp_port_range - 1,
            cfg.clock_rate,
        )

    def _account_config(self, *, outbound: bool = False, trunk: _Trunk | None = None
                        ) -> pj.AccountConfig:
        cfg = self.cfg
        acc_cfg = pj.AccountConfig()
        acc_cfg.idUri = f"sip:gateway@{self.host_port}"
        tpc = acc_cfg.mediaConfig.transportConfig
        tpc.port = cfg.rtp_port
        # pjsua picks RTP ports from `port` to `port + portRange` inclusive, RTCP one above:
        # keep both inside this endpoint's block (the next worker's starts right after it).
        tpc.portRange = max(2, cfg.rtp_port_range - 2)
        tpc.boundAddress = cfg.rtp_host or cfg.sip_host
        if cfg.media_address:
            tpc.publicAddress = cfg.media_address
        if outbound and self._proxy:
            acc_cfg.sipConfig.proxies.append(self._proxy)
        if outbound:
            # No RFC 5626 ";ob" in our Contact: there is no registration flow to keep alive.
            acc_cfg.natConfig.sipOutboundUse = 0
        if trunk is not None and trunk.username is not None and trunk.password is not None:
            # Realm "*": whatever realm the trunk's challenge names (each trunk its own account).
            acc_cfg.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", "*", trunk.username, 0, trunk.password)
            )
        return acc_cfg

    @property
    def host_port(self) -> str:
        """This endpoint's SIP address as peers should see it (Contact, default From host)."""
        return f"{self.cfg.public_address or self.cfg.sip_host}:{self.cfg.sip_port}"

    def caller_uri(self, user: str) -> str:
        """A From URI for caller id `user` (e.g. an E.164 number) at this endpoint's host (PJSIP
        prints no port in From/To: RFC 3261 table 1)."""
        host = self.cfg.public_address or self.cfg.sip_host
        return f"sip:{user}@{host.rsplit(':', 1)[0] if host.count(':') == 1 else host}"

    def _set_codecs(self) -> None:
        # G.711 first (what carriers send; no transcoding at an 8 kHz bridge), the rest off.
        keep = {"PCMU/8000/1": 255, "PCMA/8000/1": 254}
        if self.cfg.clock_rate == 16000:
            keep["G722/16000/1"] = 200
        for ci in self.ep.codecEnum2():
            self.ep.codecSetPriority(ci.codecId, keep.get(ci.codecId, 0))

    def _pump_events(self) -> None:
        self.ep.libRegisterThread("pjsua-pump")
        while self._running:
            # Returns as soon as a packet or timer is handled; the timeout only bounds how
            # long stop() waits. Short timeouts cost idle CPU in every worker.
            self.ep.libHandleEvents(500)
            if self._graveyard:
                self._sweep()

    # -- admission and object lifetimes (pump thread) -----------------------------------------
    def _select_account(self, prm: pj.OnSelectAccountParam) -> None:
        """Before pjsua creates the dialog and media of a new INVITE: admit or refuse."""
        if not prm.rdata.info.startswith("Request msg INVITE/"):
            return  # OPTIONS, MESSAGE...: pjsua's own choice
        if self._pending_media:  # the previous one failed silently after its media was made
            self.admission.churned()
        source = prm.rdata.srcAddress
        if self.source_filter is not None and not self.source_filter(source):
            reason: str | None = "source"
            self._refuse_code = 403
        else:
            reason = self.admission.decide()
            self._refuse_code = 503
        self._refuse_reason = reason or ""
        if reason is None and self._account is not None:
            self._pending_media = True
            prm.accountIndex = self._account.getId()
        elif self._refuser is not None:
            self._pending_media = False
            prm.accountIndex = self._refuser.getId()
            if reason == "source":
                log.warning("INVITE from %s refused: not an allowed source; 403", source)
            else:
                log.debug("INVITE refused before media (%s): 503", reason)

    def _rejected_incoming(self) -> None:
        if self._pending_media:
            self._pending_media = False
            self.admission.churned()

    def _bury(self, obj: pj.Call) -> None:
        """Hand a finished pjsua2 Call to the pump thread for deletion (any thread)."""
        with self._grave_lock:  # never _slot_lock here: makeCall holds it waiting for pjsua
            self._graveyard.append(obj)

    def _sweep(self) -> None:
        """Delete finished Calls where `~Call` cannot hit another call.

        `~Call` clears the user data of its call id and hangs that id up if active. Run from the
        asyncio thread it races with the pump thread giving the freed id to a new INVITE: the
        new call lost its pjsua2 object (no callbacks, never ends, its slot counted forever)
        or got a 603. Here, in the only thread that allocates incoming call ids (outbound ones
        are made under `_slot_lock`), an id that no Call claims stays free while we delete."""
        with self._slot_lock:
            with self._grave_lock:
                items, self._graveyard = self._graveyard, []
            keep: list[pj.Call] = []
            for obj in items:
                # 3 = the list, the loop variable, getrefcount's argument: nothing else holds it
                # (a callback still queued to asyncio would drop the last reference there).
                if sys.getrefcount(obj) > 3 or not _id_free_or_own(obj):
                    keep.append(obj)
            del obj
            items.clear()  # the C++ objects are deleted here, in the pump thread
            with self._grave_lock:
                self._graveyard.extend(keep)

    def stop(self) -> None:
        """Hang up what is left, drop every reference, destroy the library (asyncio thread)."""
        if not self._running:
            return
        try:
            self.ep.hangupAllCalls()
        except pj.Error:
            pass
        self._running = False
        if self._pump:
            self._pump.join(timeout=3)
        for call in list(self.calls.values()):
            call._release()
        self.calls.clear()
        for obj in self._graveyard:
            # Still referenced elsewhere (a traceback's frame, say): its `~Call` would then run
            # after libDestroy and abort the process in pjsua_call_set_user_data. Leak it.
            if sys.getrefcount(obj) > 3:
                obj.thisown = False
        self._graveyard.clear()
        for acc in (*self._trunk_accounts.values(), self._outbound, self._refuser,
                    self._account):
            if acc is not None:
                acc.shutdown()
        self._account = self._refuser = self._outbound = None
        self._trunk_accounts.clear()
        import gc

        gc.collect()
        self.ep.libDestroy()

    # -- calls ------------------------------------------------------------------------------
    def _incoming_from_pjsip(
        self, acc: _Account, call_id: int, whole_msg: str, source: str
    ) -> None:
        from media.call import PjCall

        self._pending_media = False
        self.admission.started(inbound=True)
        pj_call = PjCall(acc, call_id, counted=True)
        self.loop.call_soon_threadsafe(self._incoming, pj_call, whole_msg, source)

    def _incoming(self, pj_call: pj.Call, whole_msg: str, source: str) -> None:
        from media.call import SipCall

        request_uri, headers = parse_invite(whole_msg)
        invite = IncomingInvite(
            request_uri=request_uri,
            from_uri=headers.get("from", headers.get("f", "")),
            to_uri=headers.get("to", headers.get("t", "")),
            sip_call_id=headers.get("call-id", headers.get("i", "")),
            source=source,
            headers=headers,
        )
        call = SipCall(self, pj_call, direction="inbound")
        if self.on_incoming is None:
            call.reject_now(503)
            return
        self.on_incoming(call, invite)

    # -- outbound (asyncio thread) -----------------------------------------------------------
    def add_trunk(
        self, name: str, *, username: str | None = None, password: str | None = None
    ) -> None:
        """Make trunk `name` usable by `make_call(..., trunk=name)`; before or after `start()`.

        With credentials the trunk gets its own pjsua2 account that answers 401/407 challenges
        with them (at most MAX_ACCOUNTS - 3 such trunks: TooManyTrunkAccounts); without, its
        calls use the shared outbound account. Adding a name again with the same credentials
        does nothing; with others it is a ValueError once started."""
        if (username is None) != (password is None):
            raise ValueError(f"trunk {name!r}: username and password go together")
        trunk = _Trunk(name, username, password)
        with_creds = {n for n, t in self._trunks.items() if t.username is not None} - {name}
        if username is not None and len(with_creds) + 1 > MAX_ACCOUNTS - FIXED_ACCOUNTS:
            raise TooManyTrunkAccounts(
                f"trunk {name!r}: pjsua2 has {MAX_ACCOUNTS} accounts per process and "
                f"{FIXED_ACCOUNTS} are the gateway's; at most "
                f"{MAX_ACCOUNTS - FIXED_ACCOUNTS} trunks may have credentials"
            )
        if name in self._trunks:
            if self._trunks[name] == trunk:
                return
            if self._running:
                # Replacing a live account would pull it from under calls placed with it.
                raise ValueError(f"trunk {name!r} is already added with other credentials")
        self._trunks[name] = trunk
        if self._running and username is not None:
            self._create_trunk_account(trunk)

    @property
    def outbound_proxy(self) -> str:
        return self._proxy

    def set_outbound_proxy(self, uri: str) -> None:
        """Change the proxy of outbound calls placed from now on (`EndpointConfig.outbound_proxy`
        is the initial one; "" for none). Calls in progress keep their route set."""
        self._proxy = uri
        if not self._running:
            return
        if self._outbound is not None:
            self._outbound.modify(self._account_config(outbound=True))
        for name, acc in self._trunk_accounts.items():
            acc.modify(self._account_config(outbound=True, trunk=self._trunks[name]))

    def _create_trunk_account(self, trunk: _Trunk) -> None:
        acc = _Account(self)
        acc.create(self._account_config(outbound=True, trunk=trunk), False)
        self._trunk_accounts[trunk.name] = acc

    def make_call(
        self,
        uri: str,
        headers: dict[str, str] | None = None,
        *,
        trunk: str | None = None,
        from_uri: str | None = None,
        last_slot: bool = False,
    ) -> SipCall:
        """Send an INVITE to `uri` (asyncio thread); await `answer()` on the call for the 200 OK.

        `trunk`: a name given to `add_trunk` (its credentials answer challenges); None: the
        shared outbound account. `from_uri`: the From header's URI (the caller id, e.g.
        `caller_uri("+254700000001")`); default the endpoint's own. Goes through
        `outbound_proxy` when set. `headers` are added to the INVITE.
        Raises NoCallSlot when fewer than two pjsua2 call slots are free (inbound and outbound
        count together; the last one is kept for refusing INVITEs with 503, see
        media.admission; `last_slot=True` may take it, for a dial leg), CallSetupError when
        PJSIP refuses otherwise (bad URI...): no call exists then."""
        from media.call import PJ_ETOOMANY, CallSetupError, NoCallSlot, PjCall, SipCall

        if trunk is None:
            acc = self._outbound
        elif trunk not in self._trunks:
            raise CallSetupError(f"unknown trunk {trunk!r} (add_trunk it first)")
        else:
            acc = self._trunk_accounts.get(trunk) or self._outbound
        if acc is None:
            raise CallSetupError("the SIP endpoint is not started")
        prm = pj.CallOpParam(True)
        if from_uri:
            prm.txOption.localUri = from_uri
        for name, value in (headers or {}).items():
            h = pj.SipHeader()
            h.hName = name
            h.hValue = value
            prm.txOption.headers.append(h)
        pj_call = PjCall(acc)
        call = SipCall(self, pj_call, direction="outbound")
        with self._slot_lock:  # see _sweep: no id handed out while a Call is deleted
            if not self.admission.start_outbound(last_slot=last_slot):
                pj_call.owner = None
                self._bury(pj_call)
                raise NoCallSlot(
                    f"no call slot free: {self.admission.media_calls} of {self.cfg.max_calls} "
                    "taken (the last is kept for refusals)"
                )
            pj_call.counted = True
            call.created_at = time.monotonic()
            try:
                pj_call.makeCall(uri, prm)
            except pj.Error as e:
                pj_call.counted = False
                self.admission.ended(inbound=False)
                pj_call.owner = None
                self._bury(pj_call)
                if e.status == PJ_ETOOMANY:
                    raise NoCallSlot(f"pjsua2 has no call slot left: {e.info()}") from None
                raise CallSetupError(f"INVITE to {uri} not sent: {e.info()}", e.status) from None
            call.invite_sent_at = time.monotonic()
        call.sip_call_id = pj_call.sip_call_id
        call.register()
        return call

    def account(self) -> pj.Account:
        assert self._account is not None
        return self._account


def _id_free_or_own(obj: pj.Call) -> bool:
    call_id = obj.getId()
    if call_id < 0:  # never got an id (makeCall failed): its `~Call` touches nothing
        return True
    try:
        current = pj.Call.lookup(call_id)
    except pj.Error:
        return True
    return current is None or int(current.this) == int(obj.this)
