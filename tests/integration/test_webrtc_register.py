"""Browser registration through the real front (Kamailio's websocket module, its token check
against the node's API): minted tokens register, bad ones are refused with the reason, keys
rotate, and a registration never outlives its token. SIP over WebSocket from Python, so every
status code is exact (the browser tests cover JsSIP)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import NUMBER
from tests.integration.webrtc import (
    DOMAIN,
    FRONT,
    KEY_NEW,
    KEY_OLD,
    KEY_REMOVED,
    token,
    two_workers,
    webrtc_section,
)
from tests.integration.wssip import WsSipClient

pytestmark = pytest.mark.integration


async def mint(api_port: int, body: dict[str, Any], auth: str = "test-token"
               ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://127.0.0.1:{api_port}/v1/webrtc/token", json=body,
        headers={"Authorization": f"Bearer {auth}"},
    ) as r:
        return r.status, await r.json()


async def metric(api_port: int, name: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{api_port}/metrics") as r:
        text = await r.text()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def test_tokens_register_refuse_and_rotate(gateway_factory, voice_app):
    extra, ws_port = webrtc_section(ttl_s=120)
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=None, extra=extra, workers=two_workers(), kamailio=FRONT)
    url = f"ws://127.0.0.1:{ws_port}/"

    # Minted on the API: signed with the newest key, bound to one of the gateway's numbers.
    status, body = await mint(gw.api_port, {"client_name": "alice", "phone_number": NUMBER})
    assert status == 201, body
    assert body["endpoint"] == url and body["protocol"] == "sip"
    assert body["clientName"] == "alice" and body["expiresIn"] == 120
    assert body["sipProfile"] == {"uri": f"sip:alice@{DOMAIN}", "authorization_user": "alice",
                                  "realm": DOMAIN, "display_name": "alice"}
    import jwt
    claims = jwt.decode(body["token"], KEY_NEW[1], algorithms=["HS256"])
    assert jwt.get_unverified_header(body["token"])["kid"] == "k2"
    assert (claims["sub"], claims["number"], claims["role"]) == ("alice", NUMBER, "client")
    assert 119 <= claims["exp"] - time.time() <= 121

    # Bad mint requests name the field.
    status, err = await mint(gw.api_port, {"client_name": "bad name!"})
    assert status == 422 and "client_name" in err["error"]["message"]
    status, err = await mint(gw.api_port, {"phone_number": "+254799999999"})
    assert status == 422 and err["error"]["code"] == "numbers.not_found"
    status, err = await mint(gw.api_port, {}, auth="wrong")
    assert status == 401

    async with WsSipClient(url, "alice", DOMAIN) as ua:
        ok = await ua.register(body["token"], expires=600)
        assert ok.code == 200, (ok.code, ok.reason)
        # capped at what the token has left (600 asked, 120 s token)
        assert ok.contact_expires is not None and 100 <= ok.contact_expires <= 120, ok.headers
        assert ok.rtt_ms < 1000

        # The previous key still verifies (rotation: its tokens live out their time) ...
        old = await ua.register(token(KEY_OLD, "alice", NUMBER, ttl_s=30), expires=600)
        assert old.code == 200 and old.contact_expires is not None
        assert old.contact_expires <= 30
        # ... but not once expired (a replay after expiry), nor a removed key, nor a forgery.
        expired = await ua.register(token(KEY_OLD, "alice", NUMBER, ttl_s=30,
                                          now=time.time() - 31))
        assert (expired.code, expired.reason) == (401, "Unauthorized (token_expired)")
        assert "Bearer" in expired.headers.get("www-authenticate", "")
        removed = await ua.register(token(KEY_REMOVED, "alice", NUMBER))
        assert (removed.code, removed.reason) == (403, "Forbidden (token_unknown_key)")
        forged = await ua.register(token(("k2", "x" * 40), "alice", NUMBER))
        assert (forged.code, forged.reason) == (403, "Forbidden (token_bad_signature)")
        missing = await ua.register(None)
        assert (missing.code, missing.reason) == (401, "Unauthorized (token_missing)")
        garbage = await ua.register("not.a.jwt")
        assert garbage.code == 403 and "token_malformed" in garbage.reason
        assert "sautikit_webrtc_registrations 1.0" in await metric(
            gw.api_port, "sautikit_webrtc_registrations")
        # A token for alice does not register bob.
        other = await ua.register(body["token"], user="bob")
        assert (other.code, other.reason) == (403, "Forbidden (token_claims)")
        # Unregistering (Expires 0) takes a valid token too.
        gone = await ua.register(body["token"], expires=0)
        assert gone.code == 200
        assert "sautikit_webrtc_registrations 0.0" in await metric(
            gw.api_port, "sautikit_webrtc_registrations")

    log = gw.log_text()
    assert "REGISTER of 'alice' from" in log and "token_unknown_key" in log, log[-3000:]
    counts = await metric(gw.api_port, "sautikit_webrtc_checks_total")
    assert 'method="REGISTER",result="ok"' in counts and "token_expired" in counts, counts


async def test_only_the_front_names_a_client(gateway_factory, voice_app):
    """A carrier's INVITE claiming to be a browser client is an ordinary call; REFER from
    outside is refused before any worker could act on it (a transfer would place a call no
    voice app asked for)."""
    from tests.integration.sipraw import invite, udp_peer

    voice_app.script = lambda req, form: {"actions": [{"hangup": {}}]}
    extra, _ = webrtc_section()
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=None, extra=extra, workers=two_workers(), kamailio=FRONT)
    spoof = ("X-Sautikit-Client: mallory\r\nX-Sautikit-Client-Number: +254799999999\r\n")
    with udp_peer() as carrier:
        cid, msg = invite(gw.sip_port, carrier.port, headers=spoof)
        carrier.send(msg, gw.sip_port)
        final = await carrier.final(5, "INVITE", cid)  # the app's hangup: 603 before answer
        assert final is not None and final.startswith("SIP/2.0 603"), final
        _, refer = invite(gw.sip_port, carrier.port, method="REFER", to_tag="x1",
                          headers=f"Refer-To: <sip:+254711000777@127.0.0.1:{gw.sip_port}>\r\n")
        carrier.send(refer, gw.sip_port)
        answer = await carrier.final(3, "REFER")
        assert answer is not None and answer.startswith("SIP/2.0 405"), answer
    form = voice_app.requests[0]["form"]
    assert "client" not in form and form["from"] == "+254722000001", form


async def test_keys_rotate_on_sighup_without_a_restart(gateway_factory, voice_app):
    """Rotation as documented: a new key in front, the old one removed a TTL later, each a
    SIGHUP: registrations and the node stay, tokens follow the keys."""
    import signal

    extra, ws_port = webrtc_section(keys=(KEY_OLD,))
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=None, extra=extra, workers=two_workers(), kamailio=FRONT)
    url = f"ws://127.0.0.1:{ws_port}/"
    old_token = token(KEY_OLD, "alice", NUMBER)
    text = gw.config.read_text()

    async def reload(keys: tuple[tuple[str, str], ...], marker: str) -> None:
        new, _ = webrtc_section(keys=keys, ws_port=ws_port)
        section = extra.split("[[webrtc.keys]]")[0] + "[[webrtc.keys]]" + \
            new.split("[[webrtc.keys]]", 1)[1]
        gw.config.write_text(text.replace(extra, section))
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if marker in gw.log_text():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(gw.log_text()[-2000:])

    async with WsSipClient(url, "alice", DOMAIN) as ua:
        assert (await ua.register(old_token)).code == 200
        # 1. the new key in front: old tokens still work, new ones are signed with it
        await reload((KEY_NEW, KEY_OLD), "reloaded: k2, k1")
        assert (await ua.register(old_token)).code == 200
        status, body = await mint(gw.api_port, {"client_name": "alice", "phone_number": NUMBER})
        import jwt
        assert status == 201 and jwt.get_unverified_header(body["token"])["kid"] == "k2"
        # 2. the old key removed: its tokens are refused, the new one's are not
        await reload((KEY_NEW,), "reloaded: k2 (")
        assert (await ua.register(old_token)).reason == "Forbidden (token_unknown_key)"
        assert (await ua.register(body["token"])).code == 200
    assert gw.proc.poll() is None
