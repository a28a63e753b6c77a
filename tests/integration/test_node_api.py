"""The running node: its internal API sees live calls; a bad config stops it with a clear error."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from tests.integration.conftest import NUMBER, ROOT, final_events

pytestmark = pytest.mark.integration


async def test_active_calls_listed_with_token_only(phone, voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"pause": {"length": 3}}, {"hangup": {}}]}
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    api = f"http://127.0.0.1:{gw.api_port}"
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.answer(), 10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{api}/v1/calls") as r:
            assert r.status == 401
            err = (await r.json())["error"]
            assert err["code"] == "api_key.invalid" and err["request_id"]
        async with http.get(f"{api}/v1/calls",
                            headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.get(f"{api}/v1/calls",
                            headers={"Authorization": "Bearer test-token"}) as r:
            assert r.status == 200
            calls = (await r.json())["data"]
    assert len(calls) == 1, calls
    assert calls[0]["to"] == NUMBER and calls[0]["direction"] == "inbound"
    assert calls[0]["status"] == "in-progress" and calls[0]["worker"] == 0
    await asyncio.wait_for(call.wait_ended(), 10)
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/v1/calls",
                            headers={"Authorization": "Bearer test-token"}) as r:
            ended = (await r.json())["data"]
    # GET /v1/calls lists recent calls too: the same call, now ended
    assert [c["call_id"] for c in ended] == [calls[0]["call_id"]], ended
    assert ended[0]["status"] == "completed" and ended[0]["ended_at"], ended


def test_invalid_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sip]\nlisten = "127.0.0.1:99999"\n[api]\ntoken = "x"\n'
                   '[callbacks]\ntimeout_s = -1\n')
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 2
    assert "sip.listen" in p.stderr and "callbacks.timeout_s" in p.stderr, p.stderr


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[api]\ntoken = "x"\nlisten_on = "127.0.0.1:1"\n')
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 2 and "api.listen_on" in p.stderr, p.stderr




async def test_metrics_and_drain_on_a_running_node(phone, voice_app, receiver, gateway_factory):
    rec, events_url = receiver
    voice_app.script = lambda req, form: {"actions": [{"say": {"text": "Hi."}}, {"hangup": {}}]}
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    api = f"http://127.0.0.1:{gw.api_port}"
    auth = {"Authorization": "Bearer test-token"}
    call = phone.make_call(gw.uri)
    await asyncio.wait_for(call.wait_ended(), 15)
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/metrics") as r:
            text = await r.text()
        assert 'sautikit_calls_total{status="completed"} 1' in text, text
        assert "sautikit_call_setup_seconds_count 1" in text
        assert 'sautikit_callback_fetch_seconds_count{outcome="ok"} 1' in text
        assert 'sautikit_events_outbox{state="delivered"}' in text

        async with http.post(f"{api}/admin/drain?wait=5", headers=auth) as r:
            assert r.status == 200 and (await r.json())["drained"] is True
        refused = phone.make_call(gw.uri)
        end = await asyncio.wait_for(refused.wait_ended(), 10)
        assert end.sip_code == 503, "a draining node takes no new calls"
        async with http.get(f"{api}/healthz") as r:
            assert (await r.json())["accepting_calls"] is False
        async with http.delete(f"{api}/admin/drain", headers=auth) as r:
            assert r.status == 200
    again = phone.make_call(gw.uri)
    await asyncio.wait_for(again.answer(), 10)
    await asyncio.wait_for(again.wait_ended(), 15)


def test_demo_command_places_a_real_call():
    p = subprocess.run([sys.executable, "-m", "gateway.cli", "demo"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "demo: OK" in p.stdout
    for kind in ("call.started", "call.answered", "call.completed"):
        assert f"{kind}" in p.stdout and "signature=BAD" not in p.stdout
    assert "non-silent" in p.stdout


async def test_demo_answers_any_dialled_user_part(phone, voice_app, gateway_factory):
    # README: with the demo on, any dialled number (even `sip:1234@...`) gets the demo app;
    # the configured number still goes to its own voice app.
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=None, extra="[demo]\nenabled = true")
    call = phone.make_call(f"sip:1234@127.0.0.1:{gw.sip_port}")
    await asyncio.wait_for(call.answer(), 10)
    end = await asyncio.wait_for(call.wait_ended(), 20)
    assert end.was_answered and end.by == "remote", end  # the demo's own hangup
    for _ in range(50):  # logged (no events_url) once the gateway saw the call end
        if "call.completed" in gw.log_text():
            break
        await asyncio.sleep(0.1)
    assert "call.completed" in gw.log_text()
    assert voice_app.requests == []
