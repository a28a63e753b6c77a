"""Type-ahead on a real call: a key pressed during a `say` reaches the getDigits after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import final_events, sipp

pytestmark = pytest.mark.integration
SIPP = Path(__file__).parent / "sipp"
GREETING = "Welcome to the Sautikit test line. Press one for sales."  # about 3 s of espeak


@pytest.mark.parametrize(("flush", "want"), [(False, ["1"]), (True, [])])
async def test_key_pressed_during_say_reaches_get_digits(flush, want, voice_app, receiver,
                                                         gateway_factory):
    rec, events_url = receiver
    got: list[str] = []
    get_digits = {"timeout": 2, "numDigits": 1, **({"flushDigits": True} if flush else {})}

    def script(req, form):
        if "Digits" in form:
            got.append(form["Digits"])
            return {"actions": [{"hangup": {}}]}
        return {"actions": [{"say": {"text": GREETING}}, {"getDigits": get_digits}]}

    voice_app.script = script
    gw = gateway_factory(voice_url=f"{voice_app.base_url}/voice", app_secret=voice_app.secret,
                         events_url=events_url)
    _, ok, failed, out = await sipp(SIPP / "typeahead_1.xml", gw.sip_port, timeout=20)
    assert (ok, failed) == (1, 0), out
    assert got == want, (got, gw.log_text()[-3000:])
    assert await rec.wait_for(lambda evs: final_events(evs), 10)
