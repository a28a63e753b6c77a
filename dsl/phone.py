"""Phone numbers: the one E.164 normaliser, shared by inbound routing and `dial` (pure, no I/O)."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["normalise_e164"]

# Subscriber-number lengths (after the country code) for countries where carriers are known to
# send the bare national number without a trunk prefix, e.g. Kenya's "722000001".
_NSN_LENGTHS: dict[str, tuple[int, ...]] = {"254": (9,)}
_SEPARATORS = re.compile(r"[\s\-.()/]")


def normalise_e164(raw: str, default_cc: str = "254") -> str | None:
    """Best-effort E.164 from a Request-URI user part / tel URI; None when implausible.

    Accepts "+254 722-000-001", "tel:+254722000001;phone-context=...", "sip:0722000001@host",
    "%2B254722000001", "00254722000001", national "0722000001" and "254722000001".
    """
    s = unquote(raw).strip()
    low = s.lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if low.startswith(scheme):
            s = s[len(scheme) :]
            break
    s = s.split("@", 1)[0].split(";", 1)[0]
    s = _SEPARATORS.sub("", s)
    if s.startswith("+"):
        digits = s[1:]
    elif s.startswith("00"):
        digits = s[2:]
    elif s.startswith("0"):
        digits = default_cc + s[1:]
    elif s.startswith(default_cc):
        digits = s
    elif len(s) in _NSN_LENGTHS.get(default_cc, ()):
        digits = default_cc + s
    else:
        digits = s  # international without '+'
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    if not 8 <= len(digits) <= 15:
        return None
    return "+" + digits
