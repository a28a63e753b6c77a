"""A conference across two nodes (two gateway processes, each its own storage, ports, workers
and managed Kamailio, clustered with each other), measured on audio.

Each node has 2 workers of 1 call, so a caller's media goes worker -> its node's hub -> the
home node's hub -> worker: the three-level cascade. Who hears whom is the Goertzel levels of
the phones' recordings (tests/tones.py), never the API's view."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import Any

import aiohttp
import pytest

from gateway.cluster.membership import rendezvous
from gateway.demo import free_port_block
from tests.integration.conftest import free_port, start_gateway, write_config
from tests.integration.test_conference import (
    AFTER_HZ,
    TONES,
    Phones,
    api,
    farms,  # noqa: F401 (fixture)
    room,
    room_of,
    serve_tones,
    tone_of_call,
    tone_url,
    until,
    window,
)
from tests.integration.test_node_recovery import kamailio_pid, kill_quietly
from tests.integration.tonephones import phone_farm  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
CLUSTER_TOKEN = "cluster-test-token"


def room_homed_on(node: str) -> str:
    """A room name whose rendezvous home, with both nodes live, is `node`."""
    return next(n for n in (f"x{i}" for i in range(100))
                if rendezvous(("ws_1", n), {"a", "b"}) == node)


def node_config(voice_app: Any, events_url: str, me: str, api_port: int,
                peer_port: int) -> dict[str, Any]:
    """Node `me`'s config; its media links bind 127.0.0.1 (a) or 127.0.0.2 (b): the address
    each node is reached on."""
    base = free_port_block(2)
    media_host = "127.0.0.1" if me == "a" else "127.0.0.2"
    return dict(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
        events_url=events_url, api_port=api_port,
        workers=f"count = 2\ncalls_per_worker = 1\nreserved_slots = 0\nsip_port_start = {base}",
        kamailio='mode = "managed"\nping_interval_s = 1\n',
        extra=f'[cluster]\nnode_id = "{me}"\npeers = ["http://127.0.0.1:{peer_port}"]\n'
              f'token = "{CLUSTER_TOKEN}"\nmedia_host = "{media_host}"\n'
              f'ping_interval_s = 0.5\ndead_after_s = 2\n')


def clustered_gateway(gateway_factory: Any, voice_app: Any, events_url: str, me: str,
                      api_port: int, peer_port: int) -> Any:
    return gateway_factory(**node_config(voice_app, events_url, me, api_port, peer_port))


async def live_peers(gw: Any) -> list[str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.api_port}/cluster/v1/ping",
                            headers={"Authorization": f"Bearer {CLUSTER_TOKEN}"}) as r:
            body: dict[str, Any] = await r.json()
            return list(body["live"])


async def two_nodes(gateway_factory: Any, voice_app: Any, events_url: str) -> tuple[Any, Any]:
    pa, pb = free_port(), free_port()
    a = clustered_gateway(gateway_factory, voice_app, events_url, "a", pa, pb)
    b = clustered_gateway(gateway_factory, voice_app, events_url, "b", pb, pa)
    await until(lambda: _both_live(a, b), 10)
    return a, b


async def _both_live(a: Any, b: Any) -> bool:
    return await live_peers(a) == ["b"] and await live_peers(b) == ["a"]


async def test_room_of_four_on_two_nodes(
        voice_app, receiver, gateway_factory, farms, tmp_path):  # noqa: F811
    """2 callers on each node: each hears the other three and not itself; a mute on the home's
    API silences the other node's member for everyone; a kick (on the home's API) of the other
    node's member: its document goes on; the other node stopped: the home's members still hear
    each other."""
    _, events_url = receiver
    name = room_homed_on("a")
    voice_app.script = lambda req, form: {"actions": [
        {"conference": {"name": name}},
        {"play": {"url": tone_url(voice_app, AFTER_HZ)}},
        {"pause": {"length": 5}},
    ]}
    serve_tones(voice_app, tmp_path)
    home, other = await two_nodes(gateway_factory, voice_app, events_url)
    p, q, r_, s = TONES[:4]  # p, q on the home; r_, s on the other node
    phones = Phones(farms)
    for hz, gw in ((p, home), (q, home), (r_, other), (s, other)):
        await phones.call(gw, hz)
    conf = await room_of(home, name, 4)
    seen = await room_of(other, name, 4)  # any node shows the whole room
    assert conf["home_node"] == "a" and seen["home_node"] == "a", conf
    assert sorted(x["node"] for x in conf["participants"]) == ["a", "a", "b", "b"], conf
    # one call a worker: every member's audio crosses worker -> node hub -> home hub -> worker
    assert len({(x["node"], x["worker"]) for x in conf["participants"]}) == 4, conf
    ids = {tone_of_call(voice_app, x["call_id"]): x["call_id"] for x in conf["participants"]}
    status, listing = await api(other, "GET", "/v1/conferences")
    assert status == 200 and [c["name"] for c in listing["data"]] == [name], listing
    four = (p, q, r_, s)
    t_all = await window(2.0)

    status, body = await api(home, "POST", f"/v1/conferences/{name}/participants/{ids[r_]}",
                             {"muted": True})
    assert status == 200 and body["participant"]["muted"] is True, body
    t_muted = await window(1.5)
    status, body = await api(other, "POST", f"/v1/conferences/{name}/participants/{ids[r_]}",
                             {"muted": False})  # through the other node, forwarded home
    assert status == 200 and body["participant"]["muted"] is False, body

    status, body = await api(home, "DELETE", f"/v1/conferences/{name}/participants/{ids[s]}")
    assert status == 200, body
    t_kicked = await window(1.5)

    for hz in four:
        got, lv = phones.heard(hz, *t_all, (*four, AFTER_HZ))
        assert got == set(four) - {hz}, ("all", hz, lv)
    for hz in (p, q, s):
        got, lv = phones.heard(hz, *t_muted, four)
        assert got == set(four) - {hz, r_}, ("muted", hz, lv)
    assert phones.heard(r_, *t_muted, four)[0] == {p, q, s}, "muted: still hears"
    got, lv = phones.heard(s, *t_kicked, (*four, AFTER_HZ))
    assert got == {AFTER_HZ}, ("kicked: its document goes on", lv)
    for hz in (p, q, r_):
        got, lv = phones.heard(hz, *t_kicked, four)
        assert got == {p, q, r_} - {hz}, ("after the kick", hz, lv)
    assert (await room_of(home, name, 3))["participant_count"] == 3

    other.stop()  # the non-home node: its member drops out, the room goes on at home
    await room_of(home, name, 2)
    t_alone = await window(1.5)
    for hz in (p, q):
        got, lv = phones.heard(hz, *t_alone, four)
        assert got == {p, q} - {hz}, ("other node gone", hz, lv)
    async def saw_b_die() -> bool:
        return re.search(r"cluster: node b \(.*\) is dead", home.log_text()) is not None

    await until(saw_b_die, 5)


async def test_home_node_stopped_the_other_node_ends_the_room_for_its_members(
        voice_app, receiver, gateway_factory, farms, tmp_path):  # noqa: F811
    """The home node stops: the other node's part ends the room for its members, whose
    documents go on (the next action's tone)."""
    _, events_url = receiver
    name = room_homed_on("a")
    voice_app.script = lambda req, form: {"actions": [
        {"conference": {"name": name}},
        {"play": {"url": tone_url(voice_app, AFTER_HZ)}},
        {"pause": {"length": 5}},
    ]}
    serve_tones(voice_app, tmp_path)
    home, other = await two_nodes(gateway_factory, voice_app, events_url)
    p, q = TONES[:2]
    phones = Phones(farms)
    await phones.call(other, q)  # first: the home's hub is the other node's (a virtual worker)
    await room_of(home, name, 1)
    await phones.call(home, p)
    await room_of(home, name, 2)
    t_both = await window(1.5)
    got, lv = phones.heard(p, *t_both, (p, q, AFTER_HZ))
    assert got == {q}, ("together, at home", lv)
    home.stop()
    await asyncio.sleep(3.0)  # dead_after_s 2 + a ping
    t_after = await window(1.5)
    got, lv = phones.heard(q, *t_both, (p, q, AFTER_HZ))
    assert got == {p}, ("together", lv)
    got, lv = phones.heard(q, *t_after, (p, q, AFTER_HZ))
    assert got == {AFTER_HZ}, ("home gone: the document goes on", lv)
    assert await room(other, name) is None
    assert "home node a lost: the room ends here" in other.log_text()


async def test_other_node_killed_the_room_goes_on_at_home(
        voice_app, receiver, gateway_factory, farms, tmp_path):  # noqa: F811
    """The other node is SIGKILLed (supervisor, workers, Kamailio) while its member is in the
    room: the home sees it dead, drops its member, and its own members still hear each
    other (and no longer the dead node's)."""
    _, events_url = receiver
    name = room_homed_on("a")
    voice_app.script = lambda req, form: {"actions": [{"conference": {"name": name}}]}
    pa, pb = free_port(), free_port()
    home = clustered_gateway(gateway_factory, voice_app, events_url, "a", pa, pb)
    d = tmp_path / "killed"
    d.mkdir()
    other = start_gateway(write_config(d, **node_config(voice_app, events_url, "b", pb, pa)),
                          d, new_session=True)
    try:
        await until(lambda: _both_live(home, other), 10)
        p, q, r_ = TONES[:3]
        phones = Phones(farms)
        for hz, gw in ((p, home), (q, home), (r_, other)):
            await phones.call(gw, hz)
        await room_of(home, name, 3)
        t_all = await window(1.5)
        os.killpg(other.proc.pid, signal.SIGKILL)
        kill_quietly([kamailio_pid(other)])
        other.proc.wait(5)
        conf = await room_of(home, name, 2)
        assert {x["node"] for x in conf["participants"]} == {"a"}, conf
        t_after = await window(1.5)
    finally:
        other.stop()
        kill_quietly([kamailio_pid(other)])
    for hz in (p, q, r_):
        got, lv = phones.heard(hz, *t_all, (p, q, r_))
        assert got == {p, q, r_} - {hz}, ("all", hz, lv)
    for hz in (p, q):
        got, lv = phones.heard(hz, *t_after, (p, q, r_))
        assert got == {p, q} - {hz}, ("b killed", hz, lv)
    assert re.search(r"cluster: node b \(.*\) is dead", home.log_text())
