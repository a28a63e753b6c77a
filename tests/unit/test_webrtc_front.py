"""The browsers' side of the front as rendered: ws:// and wss:// accepted by `kamailio -c`, the
front secret only in a 0600 file, the rtpengine flags as the docs say; `[webrtc]` settings."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from gateway.kamailio import (
    RTPE_ANSWER_TO_BROWSER,
    RTPE_TO_BROWSER,
    RTPE_TO_SIP,
    KamailioConfig,
    WebRtcFront,
    check,
    find_binary,
    render,
    write,
)

SECRET = "s3cret-front-0123456789abcdef"
needs_kamailio = pytest.mark.skipif(find_binary() is None, reason="kamailio is not installed")


def cfg(tmp_path: Path, **web: object) -> KamailioConfig:
    w = WebRtcFront("127.0.0.1", 8089, "webrtc.example.invalid",
                    "http://127.0.0.1:8080/internal/webrtc/check", SECRET)
    return KamailioConfig(listen_host="127.0.0.1", listen_port=5070,
                          destinations=["sip:127.0.0.1:25101"], runtime_dir=tmp_path / "rt",
                          webrtc=dataclasses.replace(w, **web))  # type: ignore[arg-type]


def test_rendered_browser_side(tmp_path: Path) -> None:
    text, _ = render(cfg(tmp_path))
    assert "#!define WITH_WEBRTC" in text and "#!define WITH_WSS" not in text
    assert "listen=tcp:127.0.0.1:8089" in text
    assert f'rtpengine_manage("{RTPE_TO_SIP}")' in text
    assert f'rtpengine_manage("{RTPE_TO_BROWSER}")' in text
    assert f'rtpengine_manage("{RTPE_ANSWER_TO_BROWSER}")' in text
    assert "DTLS=passive" not in RTPE_ANSWER_TO_BROWSER and "RTP/AVP" in RTPE_TO_SIP
    assert '$rd == "webrtc.example.invalid"' in text
    plain, _ = render(dataclasses.replace(cfg(tmp_path), webrtc=None))
    assert "WITH_WEBRTC" not in plain.split("####### Global")[0]
    with pytest.raises(ValueError, match="front_secret"):
        render(cfg(tmp_path, front_secret="short"))
    with pytest.raises(ValueError, match="listen port"):
        render(cfg(tmp_path, listen_port=5070))


def test_the_front_secret_stays_in_a_private_file(tmp_path: Path) -> None:
    path = write(cfg(tmp_path))
    assert SECRET in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing: no certificate for the wss:// variant")
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    return key, crt


@needs_kamailio
async def test_kamailio_accepts_ws_and_wss(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    await check(cfg(tmp_path))
    key, crt = cert
    wss = cfg(tmp_path / "wss", tls_cert=str(crt), tls_key=str(key))
    text, _ = render(wss)
    assert "#!define WITH_WSS" in text and "listen=tls:127.0.0.1:8089" in text
    await check(wss)
    assert str(crt) in (wss.runtime_dir / "tls.cfg").read_text()


def settings(tmp_path: Path, webrtc: str, api: str = "127.0.0.1:8080") -> object:
    p = tmp_path / "g.toml"
    p.write_text(f'[api]\nlisten = "{api}"\ntoken = "t0ken-for-tests"\n'
                 f'[workers]\ncount = 2\n[webrtc]\n{webrtc}')
    return load_settings(p)


KEY = '[[webrtc.keys]]\nkid = "a"\nsecret = "0123456789abcdef0123456789abcdef"\n'


def test_webrtc_settings_checked(tmp_path: Path) -> None:
    s = settings(tmp_path, "enabled = true\n" + KEY)
    assert s.webrtc.endpoint == "ws://127.0.0.1:8089/"  # type: ignore[attr-defined]
    bad = {
        "enabled = true\n": "at least one of keys",
        'enabled = true\nws_listen = "0.0.0.0:8089"\n' + KEY: "only allowed on a loopback",
        'enabled = true\n[[webrtc.keys]]\nkid = "a"\nsecret = "short"\n': "at least 32 bytes",
        'enabled = true\ntls_cert = "/x.pem"\n' + KEY: "go together",
        'enabled = true\nws_listen = "10.0.0.1:8089"\ntls_cert = "/c"\ntls_key = "/k"\n'
        'rtp_address = "10.0.0.1"\n'
        '[[webrtc.keys]]\nkid = "dev"\nsecret = "dev-webrtc-secret-for-loopback-only"\n':
            "embedded default's key",
        'enabled = true\nws_listen = "10.0.0.1:8089"\ntls_cert = "/c"\ntls_key = "/k"\n' + KEY:
            "rtp_address is required",
    }
    for text, why in bad.items():
        with pytest.raises(ConfigError, match=why):
            settings(tmp_path, text)
    wss = settings(tmp_path, 'enabled = true\nws_listen = "10.0.0.1:8089"\ntls_cert = "/c"\n'
                   'tls_key = "/k"\npublic_url = "wss://voice.example.co.ke/"\n'
                   'rtp_address = "10.0.0.1!203.0.113.10"\n' + KEY)
    assert wss.webrtc.endpoint == "wss://voice.example.co.ke/"  # type: ignore[attr-defined]
