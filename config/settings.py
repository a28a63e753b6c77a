"""Gateway configuration: one validated model, loaded from TOML, overridable from the environment.

`load_settings(path)` reads a TOML file (or the embedded `config/default.toml` when `path` is
None), applies `SAUTIKIT_<SECTION>__<KEY>` environment overrides and validates the result.
Any problem raises `ConfigError` naming every bad key by dotted path, so an operator can fix a
file in one pass instead of one error per restart.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dsl.phone import DEFAULT_REGION, check_region

__all__ = [
    "DEV_API_TOKEN",
    "ENV_PREFIX",
    "ApiSettings",
    "CallbacksSettings",
    "ClusterSettings",
    "ConfigError",
    "ControlPlaneSettings",
    "DemoSettings",
    "LogSettings",
    "MediaSettings",
    "NumberSettings",
    "OutboundSettings",
    "Settings",
    "SipSettings",
    "StorageSettings",
    "TrunkSettings",
    "TtsSettings",
    "WebRtcKey",
    "WebRtcSettings",
    "WorkersSettings",
    "load_settings",
    "parse_hostport",
]

ENV_PREFIX = "SAUTIKIT_"
# The embedded default's API token. Only accepted on a loopback listen address (see Settings).
DEV_API_TOKEN = "dev-token"

_E164_RE = re.compile(r"^\+[1-9][0-9]{7,14}$")


class ConfigError(Exception):
    """The configuration is unusable. `problems` holds (dotted path, reason) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path or '<root>'}: {reason}" for path, reason in problems)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


# --------------------------------------------------------------------------- field validators


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "host:port" / "[v6]:port" into (host, port); raises ValueError."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("IPv6 addresses must be bracketed: [addr]:port")
    if not host:
        raise ValueError("host is empty")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_s!r}")
    return host, int(port_s)


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value.strip()


def _check_public_address(value: str) -> str:
    # A bare host (IP or DNS name) or host:port; only the shape is checked here.
    value = value.strip()
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError("expected a host or host:port")
    if value.count(":") == 1 or value.startswith("["):
        parse_hostport(value)
    return value


def _check_http_url(value: str) -> str:
    from urllib.parse import urlsplit

    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an absolute http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry user:password@")
    return value


def _check_e164(value: str) -> str:
    if not _E164_RE.match(value):
        raise ValueError("must be E.164: '+' then 8-15 digits, e.g. +254700000001")
    return value


def _check_cidrs(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("needs at least one address or CIDR (loopback only: ['127.0.0.0/8'])")
    out = []
    for v in value:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or CIDR") from None
    return out


def _check_nonempty_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


HostPort = Annotated[str, AfterValidator(_check_hostport)]
HttpUrlStr = Annotated[str, AfterValidator(_check_http_url)]
E164 = Annotated[str, AfterValidator(_check_e164)]
Secret = Annotated[SecretStr, AfterValidator(_check_nonempty_secret)]
Port = Annotated[int, Field(ge=1, le=65535)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)


class SipSettings(_Section):
    listen: HostPort = "127.0.0.1:5060"
    public_address: Annotated[str, AfterValidator(_check_public_address)] | None = None
    user_agent: NonEmptyStr = "Sautikit-Gateway/0.1"
    # Who may call in (INVITE): carriers, PBXs, SBCs. Others get 403 (at the front, or at the
    # single worker when there is none).
    allowed_sources: Annotated[list[str], AfterValidator(_check_cidrs)] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"]
    )


class ApiSettings(_Section):
    listen: HostPort = "127.0.0.1:8080"
    token: Secret
    # A connection that sends no complete request this long after connecting (or after its
    # last response) is closed: stalled and half-sent requests cannot pile up.
    idle_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    max_connections: int = Field(default=512, ge=1, le=65536)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def base_url(self) -> str:
        """http://host:port that local clients use; a wildcard bind is reached via loopback."""
        host, port = self.host_port
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"


class ControlPlaneSettings(_Section):
    events_url: HttpUrlStr | None = None
    resolve_url: HttpUrlStr | None = None
    # Where calls under MCP control (`control: "mcp"` on create) ask for their next actions.
    control_url: HttpUrlStr | None = None
    # validate_default so the "required when a URL is set" rule also fires when it is absent.
    secret: Secret | None = Field(default=None, validate_default=True)

    @field_validator("secret")
    @classmethod
    def _secret_required_with_urls(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if value is None and any(
            info.data.get(k) for k in ("events_url", "resolve_url", "control_url")
        ):
            raise ValueError("required when events_url, resolve_url or control_url is set")
        return value


class CallbacksSettings(_Section):
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    allow_http: bool = False
    allow_private: bool = False
    max_document_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)


class StorageSettings(_Section):
    dir: Path = Path("./var")

    @property
    def outbox_path(self) -> Path:
        return self.dir / "outbox.sqlite3"

    @property
    def recordings_dir(self) -> Path:
        return self.dir / "recordings"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"


class MediaSettings(_Section):
    clock_rate: Literal[8000, 16000] = 8000
    rtp_port_start: int = Field(default=30000, ge=1024, le=65534)
    rtp_ports_per_worker: int = Field(default=40, ge=2, le=20000)
    rtp_address: NonEmptyStr | None = None  # RTP bind address; default: the host of sip.listen
    # Bounds on a `play` URL's audio once decoded (untrusted input): longer or larger is
    # refused with media_decode_failed.
    max_play_seconds: float = Field(default=600.0, gt=0, le=86400)
    max_play_decoded_mib: int = Field(default=64, ge=1, le=4096)


class WorkersSettings(_Section):
    count: int = Field(default=0, ge=0, le=512)  # 0: enough workers for min_calls
    min_calls: int = Field(default=32, ge=1, le=100000)
    calls_per_worker: int = Field(default=0, ge=0)  # 0: probe what pjsua2 allows
    reserved_slots: int = Field(default=0, ge=0, le=8)  # per worker, kept from inbound calls
    # A worker whose event loop runs this late refuses new calls (503) and the front skips it
    # until it has been back under 100 ms (or 40 % of this) for 0.5 s; 0: never (slots alone).
    lag_limit_ms: int = Field(default=500, ge=0, le=10000)
    host: NonEmptyStr = "127.0.0.1"
    sip_port_start: Port = 25100
    # fork: from a preloaded fork server (gateway/forkserver.py); spawn: a fresh interpreter each
    start: Literal["fork", "spawn"] = "fork"


class KamailioSettings(_Section):
    # auto: managed when there is more than one worker, off with exactly one.
    mode: Literal["auto", "managed", "external", "off"] = "auto"
    binary: NonEmptyStr = "kamailio"
    children: int = Field(default=4, ge=1, le=64)
    ping_interval_s: int = Field(default=5, ge=1, le=300)
    remote_workers: list[NonEmptyStr] = Field(default_factory=list)
    # Per source address: requests outside dialogs allowed per flood_window_s; more are dropped.
    flood_limit: int = Field(default=100, ge=0, le=100000)  # 0: no limit
    flood_window_s: int = Field(default=1, ge=1, le=3600)
    # Skip workers already holding their admission limit of calls through this front.
    load_aware: bool = True


class TtsSettings(_Section):
    engine: NonEmptyStr = "espeak-ng"
    default_language: NonEmptyStr = "en-KE"
    cache_dir: Path | None = None


class DemoSettings(_Section):
    enabled: bool = False


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # Aliased: a field literally named `json` would shadow BaseModel.json.
    json_format: bool = Field(default=False, alias="json")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class RoutingSettings(_Section):
    # The country a number written without its country code belongs to (an ISO 3166-1 alpha-2
    # code phonenumbers knows): with "KE", 0722000001 and 722000001 are +254722000001.
    default_region: Annotated[str, AfterValidator(check_region)] = DEFAULT_REGION


class NumberSettings(_Section):
    e164: E164
    number_id: NonEmptyStr
    workspace_id: NonEmptyStr
    voice_callback_url: HttpUrlStr
    voice_callback_method: Literal["POST", "GET"] = "POST"
    callback_body: Literal["form", "json"] = "form"
    events_url: HttpUrlStr | None = None
    webhook_secret: Secret

    @field_validator("voice_callback_method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class TrunkSettings(_Section):
    """A carrier or SBC that outbound calls leave through (via the node's SIP front)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    address: HostPort  # host:port of the carrier's SIP edge
    transport: Literal["udp", "tcp"] = "udp"
    username: NonEmptyStr | None = None  # digest credentials, answered on 401/407
    password: Secret | None = None
    # Dialled number rewriting: `strip` leading characters removed (e.g. "+"), then `prefix`
    # added, e.g. strip "+254" and prefix "0" for a carrier that wants national numbers.
    strip: str = ""
    prefix: Annotated[str, Field(pattern=r"^[0-9+*#]{0,16}$")] = ""
    max_cps: float = Field(default=10.0, gt=0, le=10000)  # new calls per second
    max_calls: int = Field(default=0, ge=0, le=1000000)  # concurrent calls; 0: no limit

    @model_validator(mode="after")
    def _credentials_together(self) -> TrunkSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    def dial_user(self, e164: str) -> str:
        """The user part sent to this trunk for an E.164 destination."""
        user = e164[len(self.strip) :] if self.strip and e164.startswith(self.strip) else e164
        return self.prefix + user

    def request_uri(self, e164: str) -> str:
        host, port = parse_hostport(self.address)
        if ":" in host:
            host = f"[{host}]"
        tp = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:{self.dial_user(e164)}@{host}:{port}{tp}"


class OutboundSettings(_Section):
    ring_timeout_s: float = Field(default=30.0, gt=0, le=600)  # default `timeout` of a create
    # A create waits this long for a free worker slot or trunk capacity, then 503.
    queue_s: float = Field(default=5.0, ge=0, le=60)
    # Behind an external front (kamailio.mode = "external"): where workers send outbound
    # INVITEs. Managed front: the front itself; no front: straight to the trunk.
    proxy: HostPort | None = None


class ClusterSettings(_Section):
    """Nodes that share conference rooms (gateway/cluster/). No node_id: no cluster."""

    # This node's name in the cluster (rendezvous hashing, views); letters, digits, . _ -
    node_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    # The other nodes' internal API base URLs (http://host:port).
    peers: list[HttpUrlStr] = Field(default_factory=list)
    # Bearer token of the node-to-node routes (/cluster/); the same on every node, never logged.
    token: Secret | None = None
    # Where this node's media link ends bind (peers' hubs send there); loopback in tests.
    media_host: NonEmptyStr = "127.0.0.1"
    ping_interval_s: float = Field(default=1.0, gt=0, le=60)
    # A peer that answered no ping for this long is dead (its rooms' parts end or drop).
    dead_after_s: float = Field(default=3.0, gt=0, le=600)

    @model_validator(mode="after")
    def _complete(self) -> ClusterSettings:
        if self.node_id is None:
            if self.peers:
                raise ValueError("node_id is required with peers")
            return self
        if self.token is None:
            raise ValueError("token is required with node_id")
        if self.dead_after_s < 2 * self.ping_interval_s:
            raise ValueError("dead_after_s must be at least twice ping_interval_s")
        return self

    @property
    def enabled(self) -> bool:
        return self.node_id is not None


def _check_ws_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a ws:// or wss:// URL with a host")
    return value


WsUrlStr = Annotated[str, AfterValidator(_check_ws_url)]


class StreamsSettings(_Section):
    """`stream` forks: the WebSocket side (gateway/streams/)."""

    # WebSocket pings: proxies drop sockets idle for 60 s.
    ping_interval_s: float = Field(default=20.0, gt=0, le=300)
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # A socket that fails to connect or drops is tried again this many times ...
    retries: int = Field(default=2, ge=0, le=10)
    # ... within this many seconds of its first failure.
    retry_window_s: float = Field(default=5.0, gt=0, le=120)
    # A talk spurt starts once 2 frames are queued or its first frame waited this long.
    jitter_ms: int = Field(default=20, ge=0, le=500)
    # Audio a server may queue ahead of the caller (more is refused with an error frame).
    max_queued_s: float = Field(default=120.0, gt=0, le=3600)
    max_message_bytes: int = Field(default=4 << 20, ge=1024, le=64 << 20)


class AiAgentsSettings(_Section):
    """The operator's voice AI runtime, target of `aiAgent` (trusted: no URL guard)."""

    url: WsUrlStr | None = None  # unset: every aiAgent takes its onUnavailable path
    sample_rate: int = Field(default=8000, ge=8000, le=48000)  # L16 both ways
    token: Secret | None = None  # sent as Authorization: Bearer on the upgrade; never logged


DEV_WEBRTC_SECRET = "dev-webrtc-secret-for-loopback-only"  # the embedded default's key


class WebRtcKey(_Section):
    """One token-signing key (HS256). Tokens name it by `kid`."""

    kid: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    secret: Secret

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value().encode()) < 32:  # RFC 7518 3.2: at least the hash size
            raise ValueError("must be at least 32 bytes (HS256)")
        return v


class WebRtcSettings(_Section):
    """Browser calling (gateway/webrtc/): Kamailio's websocket listener, rtpengine, tokens."""

    enabled: bool = False
    # Kamailio's WebSocket listener (ws://; wss:// with tls_cert and tls_key).
    ws_listen: HostPort = "127.0.0.1:8089"
    # What browsers are told to connect to (behind a proxy or NAT); default from ws_listen.
    public_url: WsUrlStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # SIP domain of browser clients: `client:alice` registers as sip:alice@<domain>.
    domain: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,253}$")] = "webrtc.sautikit.invalid"
    # Signing keys, newest first: tokens are signed with the first and verified with any, so a
    # new key goes in front and the old one leaves once its last token expired (token_ttl_s).
    keys: list[WebRtcKey] = Field(default_factory=list)
    token_ttl_s: int = Field(default=300, ge=30, le=86400)
    # rtpengine (userspace forwarding) between the browsers' DTLS-SRTP/ICE and the workers.
    rtpengine_binary: NonEmptyStr = "rtpengine"
    rtpengine_ng_port: Port = 22222  # its control socket, on 127.0.0.1
    # The address rtpengine binds for browsers' media, `LOCAL!PUBLIC` behind NAT (rtpengine's
    # --interface form: binds LOCAL, advertises PUBLIC); required off loopback.
    rtp_address: NonEmptyStr | None = None
    rtp_port_min: int = Field(default=40000, ge=1024, le=65535)
    rtp_port_max: int = Field(default=40999, ge=1024, le=65535)
    # ICE servers handed to browsers with each token (`turnServer`), e.g.
    # {urls = "turn:turn.example.com:3478", username = "u", credential = "p"}.
    turn_server: dict[str, str] | None = None

    @model_validator(mode="after")
    def _complete(self) -> WebRtcSettings:
        if self.rtp_port_max - self.rtp_port_min < 3:
            raise ValueError("rtp_port_max must be at least rtp_port_min + 3")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not self.enabled:
            return self
        if not self.keys:
            raise ValueError("enabled needs at least one of keys = [{kid, secret}]")
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("keys: duplicate kid")
        host, _ = parse_hostport(self.ws_listen)
        if self.tls_cert is None and not is_loopback_host(host):
            raise ValueError("ws:// (no tls_cert) is only allowed on a loopback ws_listen")
        if not is_loopback_host(host) and self.rtp_address is None:
            # browsers elsewhere must be told a media address they can reach
            raise ValueError("rtp_address is required when ws_listen is not a loopback address "
                             "(LOCAL or LOCAL!PUBLIC behind NAT)")
        dev = any(k.secret.get_secret_value() == DEV_WEBRTC_SECRET for k in self.keys)
        if dev and not is_loopback_host(host):
            raise ValueError("the embedded default's key is only allowed on a loopback ws_listen")
        return self

    @property
    def endpoint(self) -> str:
        if self.public_url:
            return self.public_url
        host, port = parse_hostport(self.ws_listen)
        h = f"[{host}]" if ":" in host else host
        return f"{'wss' if self.tls_cert else 'ws'}://{h}:{port}/"


class Settings(_Section):
    sip: SipSettings = Field(default_factory=SipSettings)
    api: ApiSettings
    control_plane: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    callbacks: CallbacksSettings = Field(default_factory=CallbacksSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    workers: WorkersSettings = Field(default_factory=WorkersSettings)
    kamailio: KamailioSettings = Field(default_factory=KamailioSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    numbers: list[NumberSettings] = Field(default_factory=list)
    trunks: list[TrunkSettings] = Field(default_factory=list)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    streams: StreamsSettings = Field(default_factory=StreamsSettings)
    ai_agents: AiAgentsSettings = Field(default_factory=AiAgentsSettings)
    webrtc: WebRtcSettings = Field(default_factory=WebRtcSettings)

    @model_validator(mode="before")
    @classmethod
    def _api_section_present(cls, data: Any) -> Any:
        # Without this a missing [api] reports "api: required" instead of naming the token.
        if isinstance(data, dict) and "api" not in data:
            return {**data, "api": {}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[tuple[str, str]] = []

        host, _ = self.api.host_port
        if self.api.token.get_secret_value() == DEV_API_TOKEN and not is_loopback_host(host):
            problems.append(
                ("api.token", "the dev token is only allowed when api.listen is a loopback address")
            )

        seen: dict[str, int] = {}
        for i, num in enumerate(self.numbers):
            if num.e164 in seen:
                problems.append((f"numbers[{i}].e164", f"duplicate of numbers[{seen[num.e164]}]"))
            else:
                seen[num.e164] = i
            # Fail at load rather than on every call: the fetch would refuse these URLs anyway.
            for key in ("voice_callback_url", "events_url"):
                url = getattr(num, key)
                if url and url.startswith("http://") and not self.callbacks.allow_http:
                    problems.append(
                        (f"numbers[{i}].{key}", "http:// needs callbacks.allow_http = true")
                    )

        names: dict[str, int] = {}
        for i, trunk in enumerate(self.trunks):
            if trunk.name in names:
                problems.append((f"trunks[{i}].name", f"duplicate of trunks[{names[trunk.name]}]"))
            names.setdefault(trunk.name, i)
        if sum(1 for t in self.trunks if t.username) > 5:
            # pjsua2 holds 8 accounts per process: 2 are the gateway's, one is shared
            problems.append(("trunks", "at most 5 trunks may have digest credentials"))

        if self.demo.enabled and not (self.callbacks.allow_http and self.callbacks.allow_private):
            # The demo app is plain http on the API's (usually loopback) address.
            problems.append(
                (
                    "demo.enabled",
                    "needs callbacks.allow_http = true and callbacks.allow_private = true",
                )
            )

        rtp_end = self.media.rtp_port_start + self.workers.count * self.media.rtp_ports_per_worker
        if rtp_end > 65536:
            problems.append(
                (
                    "media.rtp_ports_per_worker",
                    f"rtp_port_start + workers.count * rtp_ports_per_worker = {rtp_end} > 65536",
                )
            )
        if self.webrtc.enabled and self.front_mode() != "managed":
            problems.append(("webrtc.enabled", "needs the managed front (kamailio.mode)"))
        if self.kamailio.mode == "off" and self.workers.count != 1:
            problems.append(("kamailio.mode", "off needs workers.count = 1 (it binds sip.listen)"))
        if self.workers.count > 1:
            sip_lo = self.workers.sip_port_start
            sip_hi = sip_lo + self.workers.count - 1
            if sip_hi > 65535:
                problems.append(("workers.sip_port_start", "worker SIP ports run past 65535"))
            elif sip_lo < rtp_end and self.media.rtp_port_start <= sip_hi:
                problems.append(
                    ("workers.sip_port_start", "worker SIP ports overlap the RTP range")
                )

        if problems:
            raise PydanticCustomError(
                "config_cross_check",
                "{summary}",
                {"summary": "; ".join(f"{p}: {r}" for p, r in problems), "problems": problems},
            )
        return self

    def front_mode(self) -> Literal["managed", "external", "off"]:
        mode = self.kamailio.mode
        if mode == "auto":
            return "off" if self.workers.count == 1 else "managed"
        return mode

    def worker_plan(self, max_calls: int) -> tuple[int, int]:
        """(worker count, calls admitted per worker) given what one pjsua2 process holds."""
        per = self.workers.calls_per_worker or max_calls
        admit = max(1, per - self.workers.reserved_slots)
        count = self.workers.count or -(-self.workers.min_calls // admit)
        return count, admit

    def number(self, e164: str) -> NumberSettings | None:
        for num in self.numbers:
            if num.e164 == e164:
                return num
        return None


def is_loopback_host(host: str | None) -> bool:
    """`localhost` or a loopback address (IPv6 with or without brackets); the one test for
    what may only run or be reached on loopback (settings, the front, the demo routes)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- loading


def load_settings(path: Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Load, override from `environ`, validate. Raises ConfigError."""
    if path is None:
        source = "embedded config/default.toml"
        text = resources.files("config").joinpath("default.toml").read_text("utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(source, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"TOML syntax error: {exc}")]) from None

    env_origin: dict[str, str] = {}
    problems = _apply_env(data, environ, env_origin)
    if problems:
        raise ConfigError(source, problems)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems_from(exc, env_origin)) from None


def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str], origin: dict[str, str]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in parts):
            problems.append((name, "malformed override name"))
            continue
        value = _env_value(environ[name], parts)
        node: Any = data
        dotted = ""
        ok = True
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                # SAUTIKIT_NUMBERS__0__WEBHOOK_SECRET: lets secrets for a file's numbers come
                # from the environment; the entry must already exist in the file.
                if not part.isdigit() or int(part) >= len(node):
                    problems.append((name, f"{dotted} has no entry [{part}]"))
                    ok = False
                    break
                key: Any = int(part)
                dotted += f"[{part}]"
            elif isinstance(node, dict):
                key = part
                dotted = f"{dotted}.{part}" if dotted else part
            else:
                problems.append((name, f"{dotted} is not a table"))
                ok = False
                break
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]
        if ok:
            origin[dotted] = name
    return problems


def _env_value(raw: str, parts: list[str]) -> Any:
    """JSON when it parses, else the raw string; string-typed keys keep non-string JSON raw."""
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(parsed, str) and _is_string_field(parts):
        # e.g. SAUTIKIT_API__TOKEN=12345 or a secret that happens to read as `true`.
        return raw
    return parsed


def _is_string_field(parts: list[str]) -> bool:
    """Whether the key at `parts` (list indices included) is typed as a string in Settings."""
    model: type[BaseModel] = Settings
    i = 0
    while i < len(parts):
        field = next((f for n, f in model.model_fields.items() if parts[i] in (n, f.alias)), None)
        if field is None:
            return False
        ann = _unwrap(field.annotation)
        if typing.get_origin(ann) is list:
            if i + 1 >= len(parts):
                return False  # the whole list (JSON), not one entry
            ann = _unwrap(typing.get_args(ann)[0])
            i += 1  # skip the list index
        i += 1
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        return i >= len(parts) and ann in (str, SecretStr, Path)
    return False


def _unwrap(ann: Any) -> Any:
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
}


def _problems_from(exc: ValidationError, env_origin: Mapping[str, str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        if err["type"] == "config_cross_check":
            ctx = err.get("ctx") or {}
            problems.extend((p, r) for p, r in ctx.get("problems", []))
            continue
        path = _dotted(err["loc"])
        reason = _MESSAGES.get(err["type"], err["msg"])
        if reason.startswith("Value error, "):
            reason = reason[len("Value error, ") :]
        problems.append((path, reason))
    return [(p, f"{r} (from {env_origin[p]})" if p in env_origin else r) for p, r in problems]


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out
