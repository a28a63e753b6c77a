from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from config.settings import ConfigError, Settings, load_settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLE = CONFIG_DIR / "gateway.example.toml"

NUMBER = """
[[numbers]]
e164 = "+254700000001"
number_id = "num_1"
workspace_id = "ws_1"
voice_callback_url = "https://voice.example.com/voice"
webhook_secret = "whsec_topsecret"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_model_defaults() -> None:
    s = Settings.model_validate({"api": {"token": "t0ken"}})
    assert s.sip.listen == "127.0.0.1:5060"
    assert s.sip.public_address is None
    assert s.api.listen == "127.0.0.1:8080"
    assert s.control_plane.events_url is None and s.control_plane.secret is None
    assert s.callbacks.timeout_s == 10
    assert s.callbacks.allow_http is False and s.callbacks.allow_private is False
    assert s.callbacks.max_document_bytes == 65536
    assert s.storage.dir == Path("./var")
    assert s.storage.recordings_dir == Path("./var/recordings")
    assert s.media.clock_rate == 8000
    assert (s.media.rtp_port_start, s.media.rtp_ports_per_worker) == (30000, 40)
    assert (s.workers.count, s.workers.calls_per_worker, s.workers.sip_port_start) == (
        0,
        0,
        25100,
    )
    assert (s.workers.min_calls, s.workers.reserved_slots) == (32, 0)
    # No worker settings: enough workers for 32 calls behind a managed Kamailio front.
    assert s.worker_plan(4) == (8, 4) and s.front_mode() == "managed"
    assert s.kamailio.mode == "auto" and s.kamailio.remote_workers == []
    assert (s.tts.engine, s.tts.default_language, s.tts.cache_dir) == ("espeak-ng", "en-KE", None)
    assert s.demo.enabled is False
    assert (s.log.level, s.log.json_format) == ("INFO", False)
    assert s.numbers == []


def test_embedded_default_loads() -> None:
    s = load_settings(None, environ={})
    assert s.sip.listen == "127.0.0.1:5060"
    assert s.api.listen == "127.0.0.1:8080"
    assert s.api.token.get_secret_value() == "dev-token"
    assert s.demo.enabled is True
    assert s.callbacks.allow_http is True and s.callbacks.allow_private is True
    assert s.api.base_url == "http://127.0.0.1:8080"


def test_example_loads_and_keeps_guards_on() -> None:
    s = load_settings(EXAMPLE, environ={})
    assert s.callbacks.allow_http is False and s.callbacks.allow_private is False
    assert s.demo.enabled is False
    assert len(s.numbers) == 1 and s.numbers[0].callback_body == "form"


def _keys(model: type[BaseModel]) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(field.alias or name)
    return out


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for section, field in Settings.model_fields.items():
        sub = field.annotation
        if typing.get_origin(sub) is list:  # [[numbers]], [[trunks]]: an array of tables
            (sub,) = typing.get_args(sub)
            assert re.search(rf"^(# )?\[\[{section}\]\]", text, re.M), section
        else:
            assert f"[{section}]" in text, section
        assert isinstance(sub, type) and issubclass(sub, BaseModel)
        for key in _keys(sub):
            # Present, possibly commented out, and preceded by a comment line.
            m = re.search(rf"^(#[^\n]*\n)(# )?{key} = ", text, re.M)
            assert m, f"{section}.{key} not documented in the example"


def test_env_overrides_nested_and_typed(tmp_path: Path) -> None:
    env = {
        "SAUTIKIT_API__TOKEN": "12345",  # looks like JSON int, but token is a string
        "SAUTIKIT_CALLBACKS__ALLOW_HTTP": "true",
        "SAUTIKIT_CALLBACKS__TIMEOUT_S": "2.5",
        "SAUTIKIT_MEDIA__CLOCK_RATE": "16000",
        "SAUTIKIT_LOG__JSON": "true",
        "SAUTIKIT_LOG__LEVEL": "debug",
        "SAUTIKIT_SIP__PUBLIC_ADDRESS": "203.0.113.10",
        "SAUTIKIT_NUMBERS__0__WEBHOOK_SECRET": "from-env",
        "SAUTIKIT_NUMBERS__0__CALLBACK_BODY": "json",
        "OTHER_THING": "ignored",
    }
    s = load_settings(write(tmp_path, '[api]\ntoken = "file"\n' + NUMBER), environ=env)
    assert s.api.token.get_secret_value() == "12345"
    assert s.callbacks.allow_http is True
    assert s.callbacks.timeout_s == 2.5
    assert s.media.clock_rate == 16000
    assert s.log.json_format is True and s.log.level == "DEBUG"
    assert s.sip.public_address == "203.0.113.10"
    assert s.numbers[0].webhook_secret.get_secret_value() == "from-env"
    assert s.numbers[0].callback_body == "json"


def test_env_override_on_embedded_default() -> None:
    s = load_settings(None, environ={"SAUTIKIT_DEMO__ENABLED": "false"})
    assert s.demo.enabled is False


def test_env_bad_value_names_key_and_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SAUTIKIT_MEDIA__CLOCK_RATE": "11025"})
    p = problems(exc)
    assert "media.clock_rate" in p and "SAUTIKIT_MEDIA__CLOCK_RATE" in p["media.clock_rate"]


def test_env_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SAUTIKIT_API__TOKNE": "x"})
    assert problems(exc)["api.tokne"].startswith("unknown key")


def test_errors_name_every_bad_key(tmp_path: Path) -> None:
    text = """
surprise = 1
[api]
token = "t"
listen = "no-port"
[media]
clock_rate = 11025
[[numbers]]
e164 = "0722000001"
number_id = "n"
workspace_id = "w"
voice_callback_url = "ftp://voice.example.com"
webhook_secret = "s"
[[numbers]]
e164 = "+254700000002"
number_id = "n2"
workspace_id = "w"
voice_callback_url = "https://voice.example.com"
"""
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    p = problems(exc)
    assert set(p) >= {
        "surprise",
        "api.listen",
        "media.clock_rate",
        "numbers[0].e164",
        "numbers[0].voice_callback_url",
        "numbers[1].webhook_secret",
    }
    assert p["surprise"] == "unknown key"
    assert p["numbers[1].webhook_secret"] == "required"
    msg = str(exc.value)
    assert "numbers[0].voice_callback_url: " in msg and str(tmp_path) in msg


def test_missing_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, "[sip]\n"), environ={})
    assert problems(exc) == {"api.token": "required"}


def test_duplicate_e164_and_cross_checks(tmp_path: Path) -> None:
    text = '[api]\ntoken = "t"\n' + NUMBER + NUMBER.replace("https://", "http://")
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    p = problems(exc)
    assert p["numbers[1].e164"] == "duplicate of numbers[0]"
    assert "allow_http" in p["numbers[1].voice_callback_url"]


def test_control_plane_secret_required(tmp_path: Path) -> None:
    text = '[api]\ntoken = "t"\n[control_plane]\nresolve_url = "https://cp.example.com/r"\n'
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    assert "required" in problems(exc)["control_plane.secret"]
    s = load_settings(
        write(tmp_path, text), environ={"SAUTIKIT_CONTROL_PLANE__SECRET": "cp-secret"}
    )
    assert s.control_plane.resolve_url == "https://cp.example.com/r"


def test_dev_token_refused_off_loopback() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SAUTIKIT_API__LISTEN": "0.0.0.0:8080"})
    assert "api.token" in problems(exc)
    s = load_settings(
        None, environ={"SAUTIKIT_API__LISTEN": "0.0.0.0:8080", "SAUTIKIT_API__TOKEN": "real"}
    )
    assert s.api.base_url == "http://127.0.0.1:8080"


def test_demo_needs_relaxed_callbacks() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SAUTIKIT_CALLBACKS__ALLOW_PRIVATE": "false"})
    assert "demo.enabled" in problems(exc)


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_settings(write(tmp_path, "[api\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_secrets_not_in_repr_or_errors(tmp_path: Path) -> None:
    s = load_settings(
        write(tmp_path, '[api]\ntoken = "api-sekrit"\n' + NUMBER),
        environ={"SAUTIKIT_CONTROL_PLANE__SECRET": "cp-sekrit"},
    )
    text = repr(s) + str(s) + repr(s.model_dump())
    for secret in ("api-sekrit", "whsec_topsecret", "cp-sekrit"):
        assert secret not in text
    bad = write(tmp_path, '[api]\ntoken = "api-sekrit"\nlisten = 5\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(bad, environ={})
    assert "api-sekrit" not in str(exc.value)


def test_frozen() -> None:
    s = load_settings(None, environ={})
    with pytest.raises(ValueError):
        s.demo.enabled = False  # type: ignore[misc]
