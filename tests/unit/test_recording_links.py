"""Signed recording links: round trip, expiry, tampering, the key file (0600, made once, shared
by processes racing to make it)."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.calls.links import KEY_FILE, LinkError, LinkSigner, load_key, recording_link

NOW = 1_790_000_000.0


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


def parts(link: str) -> tuple[str, str, str]:
    u = urlsplit(link)
    q = parse_qs(u.query)
    return u.path.removeprefix("/recordings/"), q["exp"][0], q["sig"][0]


def test_link_round_trip_and_expiry(tmp_path: Path) -> None:
    clock = Clock()
    signer = LinkSigner(load_key(tmp_path), clock=clock)
    link = signer.recording_link("http://127.0.0.1:8080/", "rec_1")
    assert link.startswith("http://127.0.0.1:8080/recordings/rec_1?exp=")
    rid, exp, sig = parts(link)
    assert int(exp) == int(NOW) + 900
    signer.verify(rid, exp, sig)
    clock.now += 899
    signer.verify(rid, exp, sig)
    clock.now += 2
    with pytest.raises(LinkError) as err:
        signer.verify(rid, exp, sig)
    assert err.value.expired


@pytest.mark.parametrize(
    "change",
    ["other id", "later exp", "flipped sig", "no sig", "no exp", "junk exp", "other key"],
)
def test_tampered_links_refused(tmp_path: Path, change: str) -> None:
    signer = LinkSigner(load_key(tmp_path), clock=Clock())
    rid, exp, sig = parts(signer.recording_link("http://h", "rec_1"))
    if change == "other id":
        rid = "rec_2"
    elif change == "later exp":
        exp = str(int(exp) + 3600)
    elif change == "flipped sig":
        sig = ("0" if sig[0] != "0" else "1") + sig[1:]
    elif change == "no sig":
        sig = ""
    elif change == "no exp":
        exp = ""
    elif change == "junk exp":
        exp = "1e99"
    elif change == "other key":
        signer = LinkSigner(os.urandom(32), clock=Clock())
    with pytest.raises(LinkError) as err:
        signer.verify(rid, exp, sig)
    assert not err.value.expired


def test_key_file_made_once_private(tmp_path: Path) -> None:
    key = load_key(tmp_path / "var")
    path = tmp_path / "var" / KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path / "var") == key  # kept: links survive a restart
    assert sorted(os.listdir(tmp_path / "var")) == [KEY_FILE]  # no temp file left behind
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="32-byte key"):
        load_key(tmp_path / "var")
    assert key.hex() not in repr(LinkSigner(key))


def test_processes_racing_share_one_key(tmp_path: Path) -> None:
    with ProcessPoolExecutor(4) as pool:
        keys = list(pool.map(load_key, [tmp_path] * 8))
    assert len(set(keys)) == 1


def test_module_function_signs_with_the_storage_key(tmp_path: Path) -> None:
    link = recording_link("http://127.0.0.1:8080", "rec_9", storage_dir=tmp_path)
    rid, exp, sig = parts(link)
    LinkSigner(load_key(tmp_path)).verify(rid, exp, sig)  # what the API process checks
    assert recording_link("http://h", "rec_9", 60, storage_dir=tmp_path).startswith(
        "http://h/recordings/rec_9?exp="
    )
