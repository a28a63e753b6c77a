"""getDigits on a trunk that signals DTMF only in-band: tones in the G.711 audio.

The SIPp carrier offers PCMA alone (no telephone-event) and never sends SIP INFO, so the
gateway's only way to hear the keys is its in-band detector (media/dtmf_inband.py), which
`getDigits` attaches when the far end did not negotiate telephone-event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import dump, final_events
from tests.integration.pcap_audio import (
    LAW_OF_PT,
    dtmf_sequence,
    pcap_audio,
    read_rtp,
    rtp_stream,
    write_rtp_pcap,
)
from tests.integration.test_record import run_sipp

pytestmark = pytest.mark.integration
TEMPLATE = Path(__file__).parent / "sipp" / "inband_carrier.xml"
PCAP_REF = 'play_pcap_audio="inband_dtmf.pcap"'


def carrier_scenario(tmp_path: Path, pcap: Path) -> Path:
    """The committed template with the generated pcap's absolute path filled in."""
    text = TEMPLATE.read_text()
    assert text.count(PCAP_REF) == 1, "the template names the pcap once"
    assert "telephone-event/" not in text and "INFO sip:" not in text  # in-band only
    scenario = tmp_path / "inband_carrier.xml"
    scenario.write_text(text.replace(PCAP_REF, f'play_pcap_audio="{pcap}"'))
    return scenario


def make_tones_pcap(path: Path, digits: str) -> Any:
    """1.5 s of silence, then each digit's tones for 100 ms at -10 dBm0 per component with
    100 ms between digits, as 20 ms PCMA packets; returns the samples written."""
    x = dtmf_sequence(digits, tone_ms=100, gap_ms=100, lead_s=1.5, tail_s=1.0, level_dbm0=-10)
    write_rtp_pcap(path, x, law="PCMA", ptime_ms=20)
    stream = rtp_stream(read_rtp(path))
    assert {LAW_OF_PT[p.pt] for p in stream} == {"PCMA"}
    assert len({p.ssrc for p in stream}) == 1 and len(stream) == -(-x.size // 160)
    assert abs(pcap_audio(path)[: x.size] - x).max() < 0.02  # what SIPp sends is the tones
    return x


async def test_inband_digits_reach_the_voice_app(voice_app, receiver, gateway_factory, tmp_path):
    rec, events_url = receiver
    got: list[str] = []

    def script(req: web.Request, form: dict[str, str]) -> dict[str, Any]:
        if "Digits" in form:
            got.append(form["Digits"])
            return {"actions": [{"hangup": {}}]}
        return {"actions": [{"getDigits": {"finishOnKey": "#", "timeout": 5}}]}

    voice_app.script = script
    gw = gateway_factory(
        voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret, events_url=events_url
    )
    pcap = tmp_path / "inband_dtmf.pcap"
    make_tones_pcap(pcap, "123#")
    code, out = await run_sipp(carrier_scenario(tmp_path, pcap), gw.sip_port, tmp_path)
    assert got == ["123"], (got, out, gw.log_text()[-3000:])
    assert code == 0, out
    digits_post = next(r for r in voice_app.requests if "Digits" in r["form"])
    assert digits_post["signature_ok"] and digits_post["method"] == "POST"
    assert await rec.wait_for(lambda evs: final_events(evs), 10), dump(rec.events)
    assert [e.kind for e in final_events(rec.events)] == ["call.completed"], dump(rec.events)
