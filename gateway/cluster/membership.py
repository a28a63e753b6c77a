"""This node's view of its cluster: which peers are live, a room's home, calls to a peer.

Liveness: every `ping_interval_s` the node GETs each peer's `/cluster/v1/ping` (the cluster
token); the answer names the peer's node_id. A peer is live while its last answer is younger
than `dead_after_s`; it goes dead on the first look past that. Changes are reported to the
listeners (the room registry): a dead peer's participants drop out of the rooms homed here, and
the parts of rooms homed on it end for their members here.

Homes: rendezvous (highest random weight) hashing of (workspace_id, name) over the live node
ids, self included, so every node with the same live view picks the same home without asking
anyone. A room keeps the home it was created on while that home lives (node parts remember it),
so a node that comes back only homes rooms created after.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

from config.settings import ClusterSettings

log = logging.getLogger(__name__)

PING_PATH = "/cluster/v1/ping"
CALL_TIMEOUT_S = 5.0


class PeerUnavailable(Exception):
    pass


@dataclass
class Peer:
    url: str
    node_id: str | None = None
    last_ok: float = 0.0
    live: bool = False


def rendezvous(key: tuple[str, str], nodes: set[str]) -> str:
    """The node among `nodes` with the highest hash of (node, workspace, name)."""
    def weight(node: str) -> bytes:
        return hashlib.sha256(f"{node}\0{key[0]}\0{key[1]}".encode()).digest()

    return max(sorted(nodes), key=weight)


class Cluster:
    def __init__(self, settings: ClusterSettings) -> None:
        assert settings.node_id is not None and settings.token is not None
        self.settings = settings
        self.node_id: str = settings.node_id
        self._token = settings.token.get_secret_value()
        self.peers = [Peer(url.rstrip("/")) for url in settings.peers]
        self.http: ClientSession | None = None
        self.on_dead: list[Callable[[str], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._telling: set[asyncio.Task[None]] = set()

    @property
    def media_host(self) -> str:
        return self.settings.media_host

    def live_nodes(self) -> set[str]:
        return {self.node_id} | {p.node_id for p in self.peers if p.live and p.node_id}

    def home_of(self, workspace_id: str, name: str) -> str:
        return rendezvous((workspace_id, name), self.live_nodes())

    def live_peers(self) -> list[str]:
        return sorted(p.node_id for p in self.peers if p.live and p.node_id)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=CALL_TIMEOUT_S))
        await self._ping_all()  # peers already up are live before the first call arrives
        self._task = asyncio.create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._telling) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ping_interval_s)
            await self._ping_all()

    async def _ping_all(self) -> None:
        await asyncio.gather(*(self._ping(p) for p in self.peers))
        now = time.monotonic()
        for p in self.peers:
            if p.live and now - p.last_ok > self.settings.dead_after_s:
                p.live = False
                log.warning("cluster: node %s (%s) is dead", p.node_id, p.url)
                for listener in self.on_dead:  # not awaited: the other peers' pings go on
                    task = asyncio.create_task(self._tell(listener, p.node_id or ""))
                    self._telling.add(task)
                    task.add_done_callback(self._telling.discard)

    async def _tell(self, listener: Callable[[str], Awaitable[None]], node_id: str) -> None:
        try:
            await listener(node_id)
        except Exception:
            log.exception("cluster: after node %s died", node_id)

    async def _ping(self, p: Peer) -> None:
        try:
            body = await self._get(p.url + PING_PATH, timeout=self.settings.ping_interval_s)
        except PeerUnavailable:
            return
        node_id = str(body.get("node_id", ""))
        if not node_id or node_id == self.node_id:
            return
        p.node_id, p.last_ok = node_id, time.monotonic()
        if not p.live:
            p.live = True
            log.info("cluster: node %s (%s) is live", node_id, p.url)

    # -- calls ----------------------------------------------------------------------------------
    def _url(self, node_id: str) -> str:
        for p in self.peers:
            if p.node_id == node_id:
                return p.url
        raise PeerUnavailable(f"no peer {node_id!r}")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def _get(self, url: str, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        assert self.http is not None
        try:
            async with self.http.get(url, headers=self._headers(),
                                     timeout=ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise PeerUnavailable(f"{url}: HTTP {r.status}")
                body: dict[str, Any] = await r.json()
                return body
        except (ClientError, TimeoutError, ValueError) as e:
            raise PeerUnavailable(f"{url}: {e!r}") from None

    async def request(self, node_id: str, method: str, path: str, body: Any = None,
                      timeout: float = CALL_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of `method path` on node `node_id`; PeerUnavailable when it
        cannot be reached or answers no JSON."""
        assert self.http is not None
        url = self._url(node_id) + path
        try:
            async with self.http.request(method, url, json=body, headers=self._headers(),
                                         timeout=ClientTimeout(total=timeout)) as r:
                return r.status, await r.json()
        except (ClientError, TimeoutError, ValueError) as e:
            raise PeerUnavailable(f"{node_id} {path}: {e!r}") from None

    async def post(self, node_id: str, path: str, body: Any) -> dict[str, Any]:
        status, out = await self.request(node_id, "POST", path, body)
        if status != 200:
            raise PeerUnavailable(f"{node_id} {path}: HTTP {status}: {out}")
        return out
