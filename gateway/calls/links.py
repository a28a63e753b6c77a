"""Signed, expiring links to recordings: `/recordings/{id}?exp=<unix s>&sig=<hex>`, served without
the internal token (the API's 302 from `GET /v1/calls/{id}/recording`, and the voice callbacks'
`RecordingUrl`).

sig = HMAC-SHA256(key, "recording\\n{id}\\n{exp}"), the key 32 random bytes in
`storage.dir/link.key` (0600), made on first use by whichever process gets there first
(supervisor or worker: a temp file hard-linked into place, so nobody ever reads half a key).
Deleting the file and restarting revokes every link handed out.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

__all__ = ["DEFAULT_TTL_S", "LinkError", "LinkSigner", "load_key", "recording_link", "signer_for"]

DEFAULT_TTL_S = 900  # 15 minutes, as the SDK documents
KEY_BYTES = 32
KEY_FILE = "link.key"
ROUTE_PREFIX = "/recordings/"


class LinkError(Exception):
    """A link that must not be served; `expired` tells an old link from a forged one."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


def load_key(storage_dir: str | os.PathLike[str]) -> bytes:
    """The node's link key, created (0600) when absent."""
    path = Path(storage_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key")
    return key


class LinkSigner:
    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("link key too short")
        self._key = key
        self.clock = clock

    @classmethod
    def from_storage(cls, storage_dir: str | os.PathLike[str]) -> LinkSigner:
        return cls(load_key(storage_dir))

    def __repr__(self) -> str:
        return "LinkSigner(<key>)"

    def _sig(self, recording_id: str, exp: int) -> str:
        msg = f"recording\n{recording_id}\n{exp}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def recording_path(self, recording_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """The path and query of a link valid for `ttl_s` seconds from now."""
        exp = int(self.clock() + ttl_s)
        rid = quote(recording_id, safe="")
        return f"{ROUTE_PREFIX}{rid}?exp={exp}&sig={self._sig(recording_id, exp)}"

    def recording_link(self, base_url: str, recording_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """`{base_url}/recordings/{id}?exp=...&sig=...`, e.g. for a callback's RecordingUrl."""
        return base_url.rstrip("/") + self.recording_path(recording_id, ttl_s)

    def verify(self, recording_id: str, exp: str | None, sig: str | None) -> None:
        """Raise LinkError unless (exp, sig) is this node's unexpired signature of the id."""
        if not exp or not sig or not exp.isascii() or not exp.isdigit() or len(exp) > 12:
            raise LinkError("missing or malformed link signature (exp, sig)")
        expected = self._sig(recording_id, int(exp))
        # compare_digest: no timing oracle on how much of the signature is right
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise LinkError("bad link signature")
        if int(exp) < self.clock():
            raise LinkError("this recording link has expired; ask for a new one", expired=True)


@functools.cache
def _signer(storage_dir: Path) -> LinkSigner:
    return LinkSigner(load_key(storage_dir))


def signer_for(storage_dir: str | os.PathLike[str]) -> LinkSigner:
    """This process's signer for a storage dir (the key read once, then kept)."""
    return _signer(Path(storage_dir).resolve())


def recording_link(
    base_url: str,
    recording_id: str,
    ttl_s: float = DEFAULT_TTL_S,
    *,
    storage_dir: str | os.PathLike[str],
) -> str:
    """A signed link to a recording, e.g. a voice callback's `RecordingUrl` built in a worker:
    `recording_link(settings.api.base_url, rid, storage_dir=settings.storage.dir)`."""
    return signer_for(storage_dir).recording_link(base_url, recording_id, ttl_s)
