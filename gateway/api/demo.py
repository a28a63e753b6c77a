"""Built-in demo voice app: what unknown numbers reach when `[demo] enabled` (no auth)."""

from __future__ import annotations

import io
import wave

import numpy as np
from aiohttp import web

__all__ = ["DEMO_CHIME_PATH", "DEMO_VOICE_PATH", "demo_document", "make_chime_wav", "setup_demo"]

DEMO_VOICE_PATH = "/demo/voice"
DEMO_CHIME_PATH = "/demo/chime.wav"

_CHIME_KEY = web.AppKey("demo_chime_wav", bytes)
_BASE_URL_KEY = web.AppKey("demo_base_url", str)


def make_chime_wav(rate: int = 8000, duration_s: float = 0.6) -> bytes:
    """A two-tone descending chime (E6 then C6, bell-like decay) as 16-bit PCM mono WAV."""
    half = int(rate * duration_s / 2)
    t = np.arange(half) / rate
    decay = np.exp(-t * 6.0)
    fade = min(half, int(rate * 0.005))  # 5 ms ramps so the tone edges do not click
    ramp = np.ones(half)
    ramp[:fade] = np.linspace(0.0, 1.0, fade)
    ramp[-fade:] = np.linspace(1.0, 0.0, fade)
    tones = [np.sin(2 * np.pi * f * t) * decay * ramp for f in (1318.5, 1046.5)]
    # Both tones stay below the 4 kHz Nyquist limit of narrowband (8 kHz) calls.
    pcm = (np.concatenate(tones) * 0.5 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def demo_document(base_url: str) -> dict[str, object]:
    return {
        "actions": [
            {
                "say": {
                    "text": "Welcome to Sautikit. Karibu.",
                    "voice": "alice",
                    "language": "en-KE",
                }
            },
            {"play": {"url": f"{base_url}{DEMO_CHIME_PATH}"}},
            {"hangup": {}},
        ]
    }


async def _voice(request: web.Request) -> web.Response:
    return web.json_response(demo_document(request.app[_BASE_URL_KEY]))


async def _chime(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_CHIME_KEY], content_type="audio/wav")


def setup_demo(app: web.Application, *, base_url: str, clock_rate: int) -> None:
    """Add the demo routes; the chime is rendered once here, at the bridge rate."""
    app[_BASE_URL_KEY] = base_url
    app[_CHIME_KEY] = make_chime_wav(clock_rate)
    app.router.add_route("POST", DEMO_VOICE_PATH, _voice)
    app.router.add_get(DEMO_VOICE_PATH, _voice)
    app.router.add_get(DEMO_CHIME_PATH, _chime)
