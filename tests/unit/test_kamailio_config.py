"""Rendering the Kamailio front's configuration, and `kamailio -c` accepting it."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.kamailio import (
    KamailioConfig,
    check,
    find_binary,
    find_module_path,
    kamailio_log_level,
    main,
    normalize_destination,
    parse_dispatcher_list,
    render,
    write,
)

ROOT = Path(__file__).resolve().parents[2]
KAMAILIO = find_binary()
needs_kamailio = pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed")

WORKERS = ["sip:127.0.0.1:25101", "sip:127.0.0.1:25102"]


def cfg(tmp_path: Path, **kw: object) -> KamailioConfig:
    base = KamailioConfig(
        listen_host="127.0.0.1",
        listen_port=5070,
        destinations=list(WORKERS),
        runtime_dir=tmp_path / "rt",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_placeholders_filled_and_values_in_place(tmp_path: Path) -> None:
    c = cfg(tmp_path, children=3, ping_interval_s=7, fr_timer_ms=1500, retry_after_s=9)
    text, _ = render(c)
    assert not re.search(r"@[A-Z_]+@", text)
    assert "listen=udp:127.0.0.1:5070" in text and "listen=tcp:127.0.0.1:5070" in text
    assert "children=3" in text
    assert 'modparam("dispatcher", "ds_ping_interval", 7)' in text
    assert 'modparam("dispatcher", "ds_probing_mode", 1)' in text
    assert 'modparam("tm", "fr_timer", 1500)' in text
    assert "Retry-After: 9" in text
    assert f'modparam("dispatcher", "list_file", "{c.list_path}")' in text
    assert f'modparam("jsonrpcs", "dgram_socket", "{c.rpc_socket}")' in text
    assert f'mpath="{find_module_path()}"' in text
    assert 'ds_select_dst("1", "4")' in text


def test_dispatcher_list_lines(tmp_path: Path) -> None:
    _, lines = render(cfg(tmp_path, disabled=frozenset({"127.0.0.1:25102"})))
    body = [ln for ln in lines.splitlines() if ln and not ln.startswith("#")]
    # setid uri flags priority: 8 = probed; 8+4 = disabled by the node (drain)
    assert body == ["1 sip:127.0.0.1:25101 8 0", "1 sip:127.0.0.1:25102 12 0"]
    _, lines = render(cfg(tmp_path, group=3))
    assert "3 sip:127.0.0.1:25101 8 0" in lines


def test_destinations_normalised_and_checked(tmp_path: Path) -> None:
    assert normalize_destination("127.0.0.1:25101") == "sip:127.0.0.1:25101"
    assert normalize_destination(" sip:10.0.0.2:25100 ") == "sip:10.0.0.2:25100"
    assert normalize_destination("sip:[2001:db8::1]:5080") == "sip:[2001:db8::1]:5080"
    for bad in ("", "sip:", "sip:a b:5060"):
        with pytest.raises(ValueError):
            normalize_destination(bad)
    with pytest.raises(ValueError, match="duplicate"):
        render(cfg(tmp_path, destinations=["127.0.0.1:25101", "sip:127.0.0.1:25101"]))


def test_listen_lines(tmp_path: Path) -> None:
    # a wildcard binds every interface (loopback included), one socket each
    text, _ = render(cfg(tmp_path, listen_host="0.0.0.0", listen_port=5060))
    assert "\nport=5060\n" in text and "listen=" not in text
    # a public address gets a loopback socket too when workers are local
    text, _ = render(cfg(tmp_path, listen_host="198.51.100.7", listen_port=5060))
    assert "listen=udp:198.51.100.7:5060\n" in text
    assert "listen=udp:127.0.0.1:5060\n" in text and "listen=tcp:127.0.0.1:5060\n" in text
    # ... and not when every worker is remote
    text, _ = render(cfg(tmp_path, listen_host="198.51.100.7", destinations=["sip:10.0.0.5:25100"]))
    assert "127.0.0.1" not in text.split("mpath")[0]
    # NAT: advertise the public address on the carrier-facing socket only
    text, _ = render(
        cfg(tmp_path, listen_host="10.0.0.4", listen_port=5060, advertise="203.0.113.9")
    )
    assert "listen=udp:10.0.0.4:5060 advertise 203.0.113.9:5060" in text
    assert "listen=udp:127.0.0.1:5060\n" in text
    text, _ = render(cfg(tmp_path, listen_host="10.0.0.4", advertise="203.0.113.9:5080"))
    assert "advertise 203.0.113.9:5080" in text
    # wildcard + advertise: the default-route address (advertised) and loopback
    text, _ = render(cfg(tmp_path, listen_host="0.0.0.0", advertise="203.0.113.9"))
    assert re.search(r"listen=udp:[0-9.]+:5070 advertise 203.0.113.9:5070", text)


def test_limits_rendered(tmp_path: Path) -> None:
    text, _ = render(cfg(tmp_path))
    # defaults: loopback may call in, flood limit on, every call offered (no load limit)
    assert 'is_in_subnet("$si", "127.0.0.0/8,::1/128")' in text
    assert "#!define WITH_FLOOD_LIMIT" in text and "#!define WITH_MAX_LOAD" not in text
    assert 'modparam("pike", "reqs_density_per_unit", 100)' in text
    assert "$ml <= 8192" in text and "> 20)" in text
    text, _ = render(
        cfg(
            tmp_path,
            allowed_sources=("192.0.2.7", "10.0.0.0/8"),
            flood_limit=0,
            max_load=3,
            max_message_bytes=3000,
            max_vias=8,
        )
    )
    assert 'is_in_subnet("$si", "192.0.2.7/32,10.0.0.0/8")' in text
    assert "#!define WITH_FLOOD_LIMIT" not in text and "#!define WITH_MAX_LOAD" in text
    assert "$var(n) >= 3)" in text and "$ml <= 3000" in text and "> 8)" in text
    for bad in (
        {"allowed_sources": ()},
        {"allowed_sources": ("carrier.example",)},
        {"max_message_bytes": 100},
        {"flood_limit": -1},
        {"max_vias": 0},
    ):
        with pytest.raises(ValueError):
            render(cfg(tmp_path, **bad))


def test_who_may_send_a_worker_an_invite() -> None:
    from config.settings import Settings
    from gateway.kamailio import source_allowed

    def settings(mode: str, count: int, **sip: object) -> Settings:
        return Settings.model_validate(
            {
                "api": {"token": "dev-token"},
                "sip": {"listen": "127.0.0.1:5060", **sip},
                "workers": {"count": count},
                "kamailio": {"mode": mode},
            }
        )

    managed = settings("managed", 2)
    assert source_allowed(managed, "127.0.0.1:5060")  # the front, from its loopback socket
    assert not source_allowed(managed, "127.0.0.1:40001")  # anyone else on this host
    assert not source_allowed(managed, "198.51.100.1:5060")
    off = settings("off", 1, allowed_sources=["198.51.100.0/24"])
    assert source_allowed(off, "198.51.100.9:5060")
    assert not source_allowed(off, "127.0.0.1:5060") and not source_allowed(off, "garbage")
    assert source_allowed(settings("external", 2), "203.0.113.1:5060")


def test_bad_configs_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        render(cfg(tmp_path, runtime_dir=Path("/tmp/" + "x" * 100)))
    with pytest.raises(ValueError, match="absolute"):
        render(cfg(tmp_path, runtime_dir=Path("relative/dir")))
    with pytest.raises(ValueError):
        render(cfg(tmp_path, listen_port=0))
    with pytest.raises(ValueError):
        render(cfg(tmp_path, children=0))


def test_write_puts_both_files_in_runtime_dir(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    path = write(c)
    assert path == c.runtime_dir / "kamailio.cfg" and path.read_text() == render(c)[0]
    assert c.list_path.read_text() == render(c)[1]


def test_parse_dispatcher_list() -> None:
    result = {
        "NRSETS": 1,
        "RECORDS": [
            {
                "SET": {
                    "ID": 1,
                    "TARGETS": [
                        {"DEST": {"URI": "sip:127.0.0.1:25102", "FLAGS": "IP", "PRIORITY": 0}},
                        {"DEST": {"URI": "sip:127.0.0.1:25101", "FLAGS": "AP", "PRIORITY": 0}},
                        {"DEST": {"URI": "sip:127.0.0.1:25103", "FLAGS": "DX", "PRIORITY": 0}},
                        {"DEST": {"URI": "sip:127.0.0.1:25104", "FLAGS": "TP", "PRIORITY": 0}},
                    ],
                }
            }
        ],
    }
    got = {d["uri"]: (d["state"], d["active"], d["probing"]) for d in parse_dispatcher_list(result)}
    assert got == {
        "sip:127.0.0.1:25102": ("inactive", False, True),
        "sip:127.0.0.1:25101": ("active", True, True),
        "sip:127.0.0.1:25103": ("disabled", False, False),
        "sip:127.0.0.1:25104": ("trying", True, True),
    }
    assert parse_dispatcher_list(None) == []


def test_kamailio_log_levels() -> None:
    assert kamailio_log_level(" 3(12) ERROR: tm [t_fwd.c:1]: x") == logging.ERROR
    assert kamailio_log_level(" 3(12) CRITICAL: <core> x") == logging.ERROR
    assert kamailio_log_level(" 3(12) WARNING: {1 INVITE abc} <script>: no worker") == (
        logging.WARNING
    )
    assert kamailio_log_level(" 0(9) NOTICE: <core> [main.c:1]: bye") == logging.INFO
    assert kamailio_log_level("Listening on") == logging.INFO


@needs_kamailio
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"listen_host": "0.0.0.0"},
        {"advertise": "203.0.113.9"},
        {"destinations": ["sip:127.0.0.1:25101"], "children": 1, "group": 2},
        {"destinations": []},
        {"flood_limit": 0, "max_load": 0},
        {"max_load": 3, "allowed_sources": ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7")},
    ],
    ids=["loopback", "wildcard", "advertise", "one-worker", "no-workers", "no-limits", "limits"],
)
async def test_kamailio_accepts_the_rendered_config(
    tmp_path: Path, variant: dict[str, object]
) -> None:
    await check(cfg(tmp_path, **variant))


@needs_kamailio
def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kam"
    argv = ["render", "--listen", "127.0.0.1:5090", "--out", str(out), "--check"]
    argv += ["--worker", "sip:127.0.0.1:25101", "--worker", "127.0.0.1:25102"]
    assert main([*argv, "--ping-interval", "3"]) == 0
    text = (out / "kamailio.cfg").read_text()
    assert "listen=udp:127.0.0.1:5090" in text and '"ds_ping_interval", 3)' in text
    assert "1 sip:127.0.0.1:25102 8 0" in (out / "dispatcher.list").read_text()
    assert "kamailio.cfg" in capsys.readouterr().out


def test_cli_render_from_gateway_toml(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        f"""
[sip]
listen = "0.0.0.0:5062"
public_address = "203.0.113.9"
[api]
listen = "127.0.0.1:8080"
token = "dev-token"
[storage]
dir = "{tmp_path / "var"}"
[workers]
count = 3
calls_per_worker = 4
sip_port_start = 25200
[kamailio]
children = 2
ping_interval_s = 4
remote_workers = ["10.0.0.5:25100"]
"""
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway.kamailio", "render", "--config", str(toml)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rt = tmp_path / "var" / "kamailio"
    lines = (rt / "dispatcher.list").read_text()
    for uri in ("sip:127.0.0.1:25200", "sip:127.0.0.1:25202", "sip:10.0.0.5:25100"):
        assert f"1 {uri} 8 0" in lines
    text = (rt / "kamailio.cfg").read_text()
    assert "advertise 203.0.113.9:5062" in text and "children=2" in text
    assert '"ds_ping_interval", 4)' in text
