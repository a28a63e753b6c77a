"""Why a document was refused: every issue names its JSON path, a stable code and a message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DocIssue:
    path: str  # e.g. "actions[1].getDigits.finishOnKey"
    code: str  # stable: "param.unknown", "ErrDialTargetXOR", ...
    message: str  # human text, with a "did you mean ...?" when one is close

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DocumentError(Exception):
    """The document is invalid; `errors` lists every problem found, in document order."""

    def __init__(self, errors: list[DocIssue]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class VerbUnsupported(Exception):
    """A valid verb this gateway cannot run yet; the interpreter ends the call cleanly."""

    def __init__(self, verb: str) -> None:
        super().__init__(f"{verb} is not supported yet")
        self.verb = verb


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest valid name: exact up to case/underscores first, then difflib."""
    options = list(candidates)
    for option in options:
        if _squash(option) == _squash(name):
            return option
    by_lower = {o.lower(): o for o in options}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def did_you_mean(message: str, name: str, candidates: Iterable[str]) -> str:
    hint = suggest(name, candidates)
    return f"{message}; did you mean {hint}?" if hint else message
