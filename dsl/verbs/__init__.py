"""The verb registry: the only place that maps a verb name in a document to its class."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from dsl.verbs.ai_agent import AiAgent
from dsl.verbs.base import PromptVerb, RunIssue, RunState, Step, Verb
from dsl.verbs.conference import Conference
from dsl.verbs.dial import Dial
from dsl.verbs.get_digits import GetDigits
from dsl.verbs.hangup import Hangup
from dsl.verbs.pause import Pause
from dsl.verbs.play import Play
from dsl.verbs.record import Record
from dsl.verbs.redirect import Redirect
from dsl.verbs.reject import Reject
from dsl.verbs.say import Say
from dsl.verbs.stream import Stream

_CLASSES: tuple[type[Verb], ...] = (
    Say,
    Play,
    GetDigits,
    Record,
    Dial,
    Conference,
    Redirect,
    Reject,
    Hangup,
    Stream,
    Pause,
    AiAgent,
)

VERBS: Mapping[str, type[Verb]] = MappingProxyType({cls.verb: cls for cls in _CLASSES})

__all__ = [
    "VERBS",
    "AiAgent",
    "Conference",
    "Dial",
    "GetDigits",
    "Hangup",
    "Pause",
    "Play",
    "PromptVerb",
    "Record",
    "Redirect",
    "Reject",
    "RunIssue",
    "RunState",
    "Say",
    "Step",
    "Stream",
    "Verb",
]
