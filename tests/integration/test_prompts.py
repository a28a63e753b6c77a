"""PromptStore against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import wave
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from media import audio
from media.errors import PromptError
from media.prompts import PromptStore
from media.tts import EspeakTts

pytestmark = pytest.mark.integration


def _encoded(fmt: str, rate: int = 22050, freq: float = 440, seconds: float = 1.0) -> bytes:
    x = audio.tone(freq, seconds, rate, -12)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], axis=1), rate, format=fmt)  # stereo on purpose
    return buf.getvalue()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    stream: bool = False  # chunked, no Content-Length


class AudioServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.conditional: Counter[str] = Counter()
        self.base = ""
        self.closing = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        route = self.routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found")
        if route.delay_s:  # cut short at teardown so cleanup doesn't wait for slow handlers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), route.delay_s)
        etag = route.headers.get("ETag")
        if etag and request.headers.get("If-None-Match") == etag:
            self.conditional[request.path] += 1
            return web.Response(status=304, headers=route.headers)
        if route.stream:
            resp = web.StreamResponse(status=route.status, headers=route.headers)
            await resp.prepare(request)
            for i in range(0, len(route.body), 4096):
                await resp.write(route.body[i : i + 4096])
            await resp.write_eof()
            return resp
        return web.Response(status=route.status, body=route.body, headers=route.headers)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
async def server() -> AsyncIterator[AudioServer]:
    srv = AudioServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.base = f"http://127.0.0.1:{port}"
    yield srv
    srv.closing.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingTts:
    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    async def synthesize(self, text, voice, language, rate) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.01)
        return audio.to_pcm16(audio.tone(500, 0.3, rate, -20))


async def allow_all(url: str) -> None:
    return None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_store(tmp_path, session, clock):
    stores: list[PromptStore] = []

    def make(**kw) -> PromptStore:
        kw.setdefault("check_url", allow_all)
        kw.setdefault("tts", CountingTts())
        check_url = kw.pop("check_url")
        tts = kw.pop("tts")
        store = PromptStore(tmp_path / "cache", 8000, tts, session, check_url, clock=clock, **kw)
        stores.append(store)
        return store

    yield make


def _assert_telephony_wav(path: Path, freq: float, seconds: float) -> None:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        assert abs(w.getnframes() / 8000 - seconds) < 0.1
    x, rate = audio.read_wav(path)
    assert abs(audio.peak_frequency(x, rate) - freq) < 3
    assert audio.rms_dbfs(x) > -20


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
async def test_fetch_and_convert(server, make_store, fmt) -> None:
    server.routes[f"/a.{fmt}"] = Route(_encoded(fmt, 16000 if fmt == "MP3" else 22050))
    path = await make_store().audio(server.url(f"/a.{fmt}"))
    _assert_telephony_wav(path, 440, 1.0)


async def test_max_age_served_from_cache_then_refetched(server, make_store, clock) -> None:
    server.routes["/m.wav"] = Route(_encoded("WAV"), headers={"Cache-Control": "max-age=60"})
    store = make_store()
    first = await store.audio(server.url("/m.wav"))
    clock.now += 59
    assert await store.audio(server.url("/m.wav")) == first
    assert server.hits["/m.wav"] == 1
    # Expired and no validators: a full refetch, new content replaces the old file in place.
    server.routes["/m.wav"] = Route(_encoded("WAV", freq=880))
    clock.now += 2
    again = await store.audio(server.url("/m.wav"))
    assert server.hits["/m.wav"] == 2 and again == first
    _assert_telephony_wav(again, 880, 1.0)


async def test_default_ttl_and_no_store(server, make_store, clock) -> None:
    server.routes["/d.wav"] = Route(_encoded("WAV"))
    server.routes["/n.wav"] = Route(_encoded("WAV"), headers={"Cache-Control": "no-store"})
    store = make_store(default_ttl_s=300)
    for _ in range(2):
        await store.audio(server.url("/d.wav"))
        await store.audio(server.url("/n.wav"))
        clock.now += 200
    assert server.hits == {"/d.wav": 1, "/n.wav": 2}
    await store.audio(server.url("/d.wav"))  # 400 s after the first fetch
    assert server.hits["/d.wav"] == 2


async def test_etag_revalidation(server, make_store, clock) -> None:
    server.routes["/e.wav"] = Route(
        _encoded("WAV"), headers={"Cache-Control": "max-age=10", "ETag": '"v1"'}
    )
    store = make_store()
    first = await store.audio(server.url("/e.wav"))
    clock.now += 11
    assert await store.audio(server.url("/e.wav")) == first
    assert server.conditional["/e.wav"] == 1  # answered 304, nothing re-downloaded
    clock.now += 5  # the 304 renewed the max-age
    await store.audio(server.url("/e.wav"))
    assert server.hits["/e.wav"] == 2


async def test_concurrent_fetches_share_one_download(server, make_store) -> None:
    server.routes["/c.ogg"] = Route(_encoded("OGG"), delay_s=0.1)
    store = make_store()
    paths = await asyncio.gather(*(store.audio(server.url("/c.ogg")) for _ in range(10)))
    assert len(set(paths)) == 1 and server.hits["/c.ogg"] == 1


async def test_404_is_fetch_failed_and_negatively_cached(server, make_store, clock) -> None:
    store = make_store(negative_ttl_s=30)
    for _ in range(3):
        with pytest.raises(PromptError) as ei:
            await store.audio(server.url("/missing.wav"))
        assert ei.value.code == "media_fetch_failed" and "404" in ei.value.message
    assert server.hits["/missing.wav"] == 1
    server.routes["/missing.wav"] = Route(_encoded("WAV"))
    clock.now += 31
    _assert_telephony_wav(await store.audio(server.url("/missing.wav")), 440, 1.0)
    assert server.hits["/missing.wav"] == 2


async def test_garbage_is_decode_failed(server, make_store) -> None:
    server.routes["/g.mp3"] = Route(b"<html><body>Oops</body></html>" * 50)
    store = make_store()
    for _ in range(2):
        with pytest.raises(PromptError) as ei:
            await store.audio(server.url("/g.mp3"))
        assert ei.value.code == "media_decode_failed"
    assert server.hits["/g.mp3"] == 1  # negatively cached too


async def test_check_url_raising_is_forbidden(server, make_store) -> None:
    checked: list[str] = []

    async def deny(url: str) -> None:
        checked.append(url)
        raise RuntimeError("private address")

    server.routes["/x.wav"] = Route(_encoded("WAV"))
    store = make_store(check_url=deny)
    with pytest.raises(PromptError) as ei:
        await store.audio(server.url("/x.wav"))
    assert ei.value.code == "url_forbidden" and "private address" in ei.value.message
    assert server.hits["/x.wav"] == 0 and checked == [server.url("/x.wav")]


async def test_cached_url_is_still_checked(server, make_store) -> None:
    allowed = True

    async def check(url: str) -> None:
        if not allowed:
            raise ValueError("now forbidden")

    server.routes["/y.wav"] = Route(_encoded("WAV"), headers={"Cache-Control": "max-age=600"})
    store = make_store(check_url=check)
    await store.audio(server.url("/y.wav"))
    allowed = False
    with pytest.raises(PromptError, match="url_forbidden"):
        await store.audio(server.url("/y.wav"))


async def test_redirect_hops_are_checked(server, make_store) -> None:
    async def check(url: str) -> None:
        if "/internal" in url:
            raise ValueError("forbidden target")

    server.routes["/ok"] = Route(status=302, headers={"Location": "/real.wav"})
    server.routes["/real.wav"] = Route(_encoded("WAV"))
    server.routes["/evil"] = Route(status=302, headers={"Location": "/internal.wav"})
    server.routes["/internal.wav"] = Route(_encoded("WAV"))
    server.routes["/loop"] = Route(status=302, headers={"Location": "/loop"})
    store = make_store(check_url=check)
    _assert_telephony_wav(await store.audio(server.url("/ok")), 440, 1.0)
    with pytest.raises(PromptError, match="url_forbidden"):
        await store.audio(server.url("/evil"))
    assert server.hits["/internal.wav"] == 0
    with pytest.raises(PromptError, match="redirects"):
        await store.audio(server.url("/loop"))


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_fetch_failed(server, make_store, stream) -> None:
    server.routes["/big.wav"] = Route(_encoded("WAV", seconds=2), stream=stream)
    with pytest.raises(PromptError) as ei:
        await make_store(max_bytes=50_000).audio(server.url("/big.wav"))
    assert ei.value.code == "media_fetch_failed" and "larger than 50000" in ei.value.message


async def test_slow_server_times_out(server, make_store) -> None:
    server.routes["/slow.wav"] = Route(_encoded("WAV"), delay_s=2)
    store = make_store(fetch_timeout_s=0.2)
    with pytest.raises(PromptError, match="timed out"):
        await asyncio.wait_for(store.audio(server.url("/slow.wav")), 5)


async def test_unreachable_is_fetch_failed(make_store) -> None:
    with pytest.raises(PromptError, match="media_fetch_failed"):
        await make_store().audio("http://127.0.0.1:1/x.wav")


async def test_tts_bytes_engine_cached(make_store) -> None:
    tts = CountingTts()
    store = make_store(tts=tts)
    paths = await asyncio.gather(*(store.tts("Hi", "woman", "en-KE") for _ in range(5)))
    assert len(set(paths)) == 1 and tts.calls == 1
    assert await store.tts("Hi", "woman", "en-KE") == paths[0] and tts.calls == 1
    await store.tts("Hi", "man", "en-KE")
    assert tts.calls == 2
    with wave.open(str(paths[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)


async def test_tts_engine_errors_become_tts_failed(make_store) -> None:
    class Broken:
        name = "broken"

        async def synthesize(self, text, voice, language, rate) -> bytes:
            raise RuntimeError("boom")

    with pytest.raises(PromptError) as ei:
        await make_store(tts=Broken()).tts("Hi", None, None)
    assert ei.value.code == "tts_failed" and "boom" in ei.value.message


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing")
async def test_tts_with_espeak(make_store, tmp_path) -> None:
    engine = EspeakTts(tmp_path / "cache" / "tts")
    store = make_store(tts=engine)
    path = await store.tts("Karibu Sautikit", None, "sw-KE")
    assert await store.tts("Karibu Sautikit", None, "sw-KE") == path
    assert engine.runs == 1
    x, rate = audio.read_wav(path)
    assert rate == 8000 and audio.active_duration(x, rate) > 0.5


async def test_size_bound_evicts_least_recently_used(server, make_store, tmp_path) -> None:
    for name in "abc":
        server.routes[f"/{name}.wav"] = Route(_encoded("WAV", seconds=1))
    # Each converted file is ~16 KB at 8 kHz; room for two.
    store = make_store(max_cache_bytes=40_000, prune_grace_s=0)
    other = tmp_path / "cache" / "recordings" / "keep.wav"  # not the store's: never pruned
    audio.write_wav_atomic(other, audio.silence(2, 8000), 8000)
    os.utime(other, (0, 0))
    a = await store.audio(server.url("/a.wav"))
    b = await store.audio(server.url("/b.wav"))
    os.utime(a, (1, 1))  # a is the least recently used
    os.utime(b, (2, 2))
    c = await store.audio(server.url("/c.wav"))  # writing 2 files > 5 % of the bound: prune
    assert not a.exists() and c.exists() and other.exists()
    # An evicted entry is simply fetched again.
    assert await store.audio(server.url("/a.wav")) == a and a.exists()
    assert server.hits["/a.wav"] == 2
