"""The node's plan: how many workers, what each listens on (SIP port, RTP range), how many calls
each takes, and where outbound INVITEs leave. One function, used by the supervisor (to start
workers), by each worker (to find its own place), and by the Kamailio render (its destinations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from config.settings import ConfigError, Settings, parse_hostport


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker listens and how many calls it takes."""

    index: int
    sip_host: str
    sip_port: int
    rtp_port: int
    rtp_ports: int
    max_calls: int  # pjsua2 call slots
    admit: int  # inbound calls admitted; outbound legs may use every slot

    @property
    def sip(self) -> str:
        return f"{self.sip_host}:{self.sip_port}"

    @property
    def uri(self) -> str:
        return f"sip:{self.sip}"


@dataclass(frozen=True)
class NodePlan:
    front: Literal["managed", "external", "off"]
    workers: tuple[WorkerPlace, ...]
    outbound_proxy: str  # the Route outbound INVITEs take ("" = straight to the trunk)
    remote_workers: tuple[str, ...] = ()

    @property
    def destinations(self) -> list[str]:
        """The front's dispatcher set: local workers, then other nodes' (remote_workers)."""
        return [w.uri for w in self.workers] + list(self.remote_workers)

    @property
    def admit(self) -> int:
        return min((w.admit for w in self.workers), default=0)


def loopback_for(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


def plan_node(settings: Settings, *, max_calls: int | None = None,
              probe_cache: Path | None = None) -> NodePlan:
    """The plan for `settings`. `max_calls` is what one pjsua2 process holds; without it (and
    without `workers.calls_per_worker`) a subprocess probes it once (cached in `probe_cache`)."""
    from gateway.kamailio import normalize_destination

    s = settings
    per = max_calls or s.workers.calls_per_worker
    if not per:
        from media.probe import probe_max_calls

        per = probe_max_calls(probe_cache or s.storage.dir / "pjsua2-probe.json")
    count, admit = s.worker_plan(per)
    mode = s.front_mode()
    host, port = parse_hostport(s.sip.listen)
    workers = []
    for i in range(count):
        rtp = s.media.rtp_port_start + i * s.media.rtp_ports_per_worker
        if rtp + s.media.rtp_ports_per_worker > 65536:
            raise ConfigError(
                "workers", [("media.rtp_port_start", f"{count} workers need RTP ports past 65535")]
            )
        sip_host, sip_port = (host, port) if mode == "off" else (
            s.workers.host, s.workers.sip_port_start + i
        )
        workers.append(
            WorkerPlace(i, sip_host, sip_port, rtp, s.media.rtp_ports_per_worker, per, admit)
        )
    if mode == "managed":
        proxy = f"sip:{loopback_for(host)}:{port};lr"
    elif mode == "external" and s.outbound.proxy:
        proxy = f"sip:{s.outbound.proxy};lr"
    else:
        proxy = ""
    remotes = tuple(normalize_destination(r) for r in s.kamailio.remote_workers)
    return NodePlan(mode, tuple(workers), proxy, remotes)
