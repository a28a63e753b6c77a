"""Phone numbers: the one E.164 normaliser, shared by inbound routing, the API and `dial`.

`phonenumbers` (libphonenumber's metadata) reads any country's forms; a number written without
its country code is read in a default region (`[routing] default_region`, "KE" unless set), so
with "KE" `0722000001`, `722000001`, `254722000001`, `00254722000001`, `000254722000001`
(Kenya's own international prefix) and `+254 722-000-001` are all `+254722000001`, and with
"NG" `08031234567` is `+2348031234567`. SIP and tel URIs (`sip:0722000001@host;user=phone`,
`tel:+254722000001;phone-context=...`) and percent-encoding (`%2B254...`) are unwrapped first.

What is accepted (the bar):
- A number written with its country code (`+`, `00`, the region's international prefix, or
  the region's own code without the `+` as carriers send it: `254722000001`) needs a length
  that is possible for that country (`is_possible_number`). It need not be in a range the
  metadata lists as allocated (`is_valid_number`): the metadata lags new ranges, and whoever
  handles the number next (the numbers table, the control plane, a trunk answering 404) knows
  better than a guess.
- A number without it (national `0722000001`, bare `722000001`) is a guess about which
  country is meant, so it must be a valid number of the default region; failing that, digits
  without a trunk prefix are tried as a full international number (`14155550123`), again only
  if valid. Otherwise it is refused ("not a valid number for KE"): a national form that is not
  valid for the region is more often another country's number without its code than a range
  too new for the metadata.
Every test and documented number (+254700000001, +254722000001, ...) is valid either way.

Refusals carry a reason (`InvalidNumber.reason`): "empty", "not a phone number", "invalid
country code", "too short for +254 (KE)", "too long for +1 (US)", "not a valid number for KE".
"""

from __future__ import annotations

import functools
import re
from urllib.parse import unquote

import phonenumbers
from phonenumbers import (
    NumberParseException,
    PhoneNumber,
    ValidationResult,
    is_possible_number_with_reason,
    is_valid_number,
)

__all__ = [
    "DEFAULT_REGION",
    "InvalidNumber",
    "check_region",
    "default_region",
    "normalise_e164",
    "parse_e164",
    "set_default_region",
]

DEFAULT_REGION = "KE"
_region = DEFAULT_REGION

_SCHEMES = ("sips:", "sip:", "tel:")
# What a dialled number may hold: digits, a leading "+", visual separators (RFC 3966 allows
# "-", "." and "()"; carriers and people write spaces and "/"). Letters are refused, not read
# as a keypad's vanity letters as phonenumbers would.
_DIALLABLE = re.compile(r"^\+?[0-9\s\-.()/]+$", re.ASCII)
_CC = phonenumbers.CountryCodeSource
_EXPLICIT_CC = (
    _CC.FROM_NUMBER_WITH_PLUS_SIGN,
    _CC.FROM_NUMBER_WITH_IDD,
    _CC.FROM_NUMBER_WITHOUT_PLUS_SIGN,  # the region's own code, read as such by phonenumbers
)
_LENGTH_REASONS = {
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "too short (a local number without its area code)",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.INVALID_LENGTH: "wrong length",
}
_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "invalid country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_LONG: "too long",
}


class InvalidNumber(ValueError):
    """A string that is not a phone number we would route or dial; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_region(region: str) -> str:
    """An ISO 3166-1 alpha-2 region phonenumbers knows ("KE", "NG"), upper-cased."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"{region!r} is not a region code phonenumbers knows: expected an ISO 3166-1"
            " alpha-2 code such as KE, NG, TZ, UG, US"
        )
    return code


def set_default_region(region: str) -> None:
    """The region national forms are read in, for this process (the node's and each worker's
    start set it from `[routing] default_region`; `dial` numbers in documents use it)."""
    global _region
    _region = check_region(region)


def default_region() -> str:
    return _region


def parse_e164(raw: str, region: str | None = None) -> str:
    """The E.164 form of a dialled number, URI or user part; raises InvalidNumber (why not)."""
    e164, reason = _parse(raw, region or _region)
    if e164 is None:
        raise InvalidNumber(reason)
    return e164


def normalise_e164(raw: str, region: str | None = None) -> str | None:
    """`parse_e164`, with None for a refused number (callers that need no reason)."""
    return _parse(raw, region or _region)[0]


@functools.lru_cache(maxsize=4096)  # a parse is ~0.1 ms; callers and callees repeat
def _parse(raw: str, region: str) -> tuple[str | None, str]:
    s = _unwrap(raw)
    if not s:
        return None, "empty"
    if not _DIALLABLE.match(s):
        return None, "not a phone number"
    first = _read(s, region)
    if isinstance(first, PhoneNumber):
        return _e164(first), ""
    if s.startswith("00"):  # the usual international prefix where the region's is another
        again = _read("+" + s[2:], region)
    elif s[0] not in "+0":  # full international digits without the "+": a guess, so valid
        again = _read("+" + s, region)
        if isinstance(again, PhoneNumber) and not is_valid_number(again):
            again = first
    else:
        return None, first
    return (_e164(again), "") if isinstance(again, PhoneNumber) else (None, first)


def _unwrap(raw: str) -> str:
    s = unquote(raw).strip()
    low = s.lower()
    for scheme in _SCHEMES:
        if low.startswith(scheme):
            s = s[len(scheme) :]
            break
    return s.split("@", 1)[0].split(";", 1)[0].strip()


def _read(s: str, region: str) -> PhoneNumber | str:
    """The number when it passes the bar (module docstring), else the reason it does not."""
    try:
        num = phonenumbers.parse(s, region, keep_raw_input=True)
    except NumberParseException as e:
        return _PARSE_REASONS.get(e.error_type, "not a phone number")
    if num.country_code_source in _EXPLICIT_CC or s.startswith("+"):
        why = is_possible_number_with_reason(num)
        if why == ValidationResult.INVALID_COUNTRY_CODE:
            return "invalid country code"
        if why != ValidationResult.IS_POSSIBLE:
            return f"{_LENGTH_REASONS.get(why, 'wrong length')} for {_country(num)}"
        return num
    if is_valid_number(num):
        return num
    why = is_possible_number_with_reason(num)
    if why in _LENGTH_REASONS:
        return f"{_LENGTH_REASONS[why]} for {region}"
    return f"not a valid number for {region}"


def _country(num: PhoneNumber) -> str:
    """"+254 (KE)"; a code shared by several regions names its main one ("+1 (US)")."""
    cc = num.country_code or 0
    return f"+{cc} ({phonenumbers.region_code_for_country_code(cc)})"


def _e164(num: PhoneNumber) -> str:
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
