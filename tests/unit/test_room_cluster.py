"""Two nodes' room registries wired through an in-process stand-in for the cluster API: the
home keeps the other node's members under a virtual worker, the node part's hub links to the
home's hub (addresses exchanged), control goes home, a dead peer or home is cleaned up. Settings
of `[cluster]` and the rendezvous."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from config.settings import ClusterSettings
from gateway.cluster.membership import PeerUnavailable, rendezvous
from gateway.control.errors import OpRefused
from gateway.control.room_join import RoomJoin
from gateway.control.room_leave import RoomLeave
from gateway.control.room_part import RoomPart
from gateway.rooms.registry import RoomNotFound, RoomRegistry
from tests.unit.test_room_registry import FakeWorker, links_of


class FakeCluster:
    """The cluster routes of gateway/cluster/routes.py, called directly on the peer."""

    def __init__(self, node_id: str, nodes: dict[str, RoomRegistry]) -> None:
        self.node_id = node_id
        self.nodes = nodes
        self.on_dead: list[Any] = []
        self.down: set[str] = set()

    def live_peers(self) -> list[str]:
        return sorted(n for n in self.nodes if n != self.node_id and n not in self.down)

    def home_of(self, workspace_id: str, name: str) -> str:
        return rendezvous((workspace_id, name), {self.node_id, *self.live_peers()})

    async def request(self, node: str, method: str, path: str, body: Any = None,
                      timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        if node in self.down:
            raise PeerUnavailable(node)
        reg = self.nodes[node]
        if path == "/cluster/v1/rooms/join":
            try:
                out = await reg.join_here(reg.virtual(body["node"]),
                                          RoomJoin.model_validate(body["op"]),
                                          node=body["node"], node_worker=body["worker"])
            except OpRefused as e:
                return 409, {"code": e.code, "message": e.message}
            return 200, out
        if path == "/cluster/v1/rooms/leave":
            return 200, await reg.on_leave(-1, RoomLeave(**body))
        if path == "/cluster/v1/rooms/part":
            return 200, await reg.apply_part(body["home"],
                                             RoomPart.model_validate(body["part"]))
        if path.startswith("/cluster/v1/conferences/"):
            name = path.split("/")[4].split("?")[0]
            try:
                reg.find(name)
            except RoomNotFound:
                return 404, {}
            return 200, {}
        raise AssertionError(path)

    async def post(self, node: str, path: str, body: Any) -> dict[str, Any]:
        return (await self.request(node, "POST", path, body))[1]


@pytest.fixture
def nodes() -> tuple[dict[str, RoomRegistry], dict[str, dict[int, FakeWorker]]]:
    regs: dict[str, RoomRegistry] = {}
    workers: dict[str, dict[int, FakeWorker]] = {}
    for n in ("a", "b"):
        ws = workers[n] = {i: FakeWorker(i) for i in range(3)}
        regs[n] = RoomRegistry(lambda i, ws=ws: ws[i] if ws[i].alive else None,  # type: ignore[misc]
                               FakeCluster(n, regs))  # type: ignore[arg-type]
    return regs, workers


def name_homed_on(node: str) -> str:
    return next(f"r{i}" for i in range(100) if rendezvous(("ws_1", f"r{i}"), {"a", "b"}) == node)


def join(call_id: str, name: str) -> RoomJoin:
    return RoomJoin(call_id=call_id, workspace_id="ws_1", name=name)


async def test_a_three_level_tree_across_two_nodes(nodes):
    regs, workers = nodes
    name = name_homed_on("a")
    await regs["a"].on_join(0, join("a0", name))
    await regs["a"].on_join(1, join("a1", name))
    await regs["b"].on_join(2, join("b2", name))
    await regs["b"].on_join(1, join("b1", name))
    home = regs["a"].find(name)
    assert sorted(p.call_id for p in home.participants.values()) == ["a0", "a1", "b1", "b2"]
    assert {p.node for p in home.participants.values()} == {"a", "b"}
    with pytest.raises(RoomNotFound):
        regs["b"].find(name)  # a node part is not the room
    part = regs["b"].rooms[("ws_1", name)]
    assert part.home == "a" and part.hub == 2 and home.hub == 0
    # the home's hub: a link to worker 1 and one to node b (a virtual worker)
    v = regs["a"].virtual("b")
    a_hub = links_of(workers["a"][0])
    assert set(a_hub) == {1, v}
    # b's hub: a link to its worker 1 and one to a's hub, each end knowing the other's address
    b_hub = links_of(workers["b"][2])
    ext = next(e for e in b_hub if e < 0)
    assert set(b_hub) == {1, ext}
    assert b_hub[ext] == ("127.0.0.1", workers["a"][0].port(v))
    assert a_hub[v] == ("127.0.0.1", workers["b"][2].port(ext))
    assert links_of(workers["b"][1]) == {2: ("127.0.0.1", workers["b"][2].port(1))}

    # a mute at home reaches the member's own worker on b; a kick ends its seat there
    await regs["a"].set_flags(home, "b1", muted=True)
    assert [m.muted for m in workers["b"][1].last.members] == [True]
    await regs["a"].kick(home, "b1")
    assert workers["b"][1].last.removed == {"b1": "kicked"}
    assert workers["b"][1].last.ended  # its only member gone: the part on worker 1 closes
    # a leave on b goes home
    await regs["b"].on_leave(2, RoomLeave(call_id="b2", room_id=part.id))
    assert sorted(home.participants) == ["a0", "a1"]
    assert workers["b"][2].last.ended and ("ws_1", name) not in regs["b"].rooms
    assert set(links_of(workers["a"][0])) == {1}


async def test_a_dead_peer_drops_out_and_a_dead_home_ends_the_part(nodes):
    regs, workers = nodes
    name = name_homed_on("a")
    await regs["a"].on_join(0, join("a0", name))
    await regs["b"].on_join(0, join("b0", name))
    await regs["b"].on_join(1, join("b1", name))
    home = regs["a"].find(name)
    regs["a"].cluster.down.add("b")  # type: ignore[union-attr]
    await regs["a"].node_lost("b")
    assert sorted(home.participants) == ["a0"] and not links_of(workers["a"][0])
    # b's view: its home is lost; the part ends for its members, who go on with their documents
    await regs["b"].node_lost("a")
    assert workers["b"][0].last.ended and workers["b"][0].last.removed == {"b0": "ended"}
    assert workers["b"][1].last.removed == {"b1": "ended"}


async def test_a_live_room_keeps_its_home(nodes):
    regs, _ = nodes
    name = name_homed_on("b")
    regs["a"].cluster.down.add("b")  # type: ignore[union-attr]
    await regs["a"].on_join(0, join("a0", name))  # b looked dead: homed on a
    regs["a"].cluster.down.clear()  # type: ignore[union-attr]
    await regs["b"].on_join(0, join("b0", name))  # b wins the rendezvous, but a has it
    assert sorted(regs["a"].find(name).participants) == ["a0", "b0"]


def test_cluster_settings() -> None:
    assert not ClusterSettings().enabled
    with pytest.raises(ValidationError, match="token is required"):
        ClusterSettings(node_id="a")
    with pytest.raises(ValidationError, match="node_id is required"):
        ClusterSettings(peers=["http://127.0.0.1:8081"])
    with pytest.raises(ValidationError):
        ClusterSettings(node_id="a:b", token="t")  # type: ignore[arg-type]
    s = ClusterSettings(node_id="a", token="s3cr3t", peers=["http://127.0.0.1:8081"])  # type: ignore[arg-type]
    assert s.enabled and "s3cr3t" not in repr(s)


def test_rendezvous_is_stable_and_spreads() -> None:
    homes = [rendezvous(("ws", f"room{i}"), {"a", "b", "c"}) for i in range(300)]
    assert {h: homes.count(h) for h in "abc"} == {h: homes.count(h) for h in "abc"}
    assert all(homes.count(h) > 60 for h in "abc")
    # a node leaving moves only its own rooms
    after = [rendezvous(("ws", f"room{i}"), {"a", "b"}) for i in range(300)]
    assert all(x == y for x, y in zip(homes, after, strict=True) if x != "c")


@pytest.mark.parametrize("cluster_token", ["clu-token", None])
async def test_cluster_routes_take_the_cluster_token_only(cluster_token: str | None) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.api.app import _auth_middleware
    from gateway.api.errors import error_middleware

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(middlewares=[error_middleware,
                                       _auth_middleware("api-token", cluster_token)])
    app.router.add_get("/cluster/v1/ping", ok)
    app.router.add_get("/v1/conferences", ok)
    async with TestClient(TestServer(app)) as c:
        def auth(t: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {t}"}

        r = await c.get("/cluster/v1/ping", headers=auth("api-token"))
        assert r.status == 401
        r = await c.get("/cluster/v1/ping", headers=auth("clu-token"))
        assert r.status == (200 if cluster_token else 401)
        r = await c.get("/v1/conferences", headers=auth("clu-token"))
        assert r.status == 401
        r = await c.get("/v1/conferences", headers=auth("api-token"))
        assert r.status == 200
