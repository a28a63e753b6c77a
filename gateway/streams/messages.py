"""The text frames a stream's server may send (audio.drachtio.org, as jambonz's `listen`), one
model per `type`, and the frames the gateway sends back.

Extra keys are ignored (servers written for jambonz send their own); a frame whose `type` is
unknown, or whose fields are wrong, is answered with an error frame and otherwise ignored.
Every frame the gateway sends carries a top-level `event` key: Pipecat's jambonz serializer
reads `message["event"]` of each text frame it receives.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PlayAudioData(_In):
    audio_content: str = Field(alias="audioContent", min_length=1)  # base64
    audio_content_type: Literal["raw", "wav"] = Field("raw", alias="audioContentType")
    # Bounded below: upsampling a 4 MiB frame from 1 Hz would take gigabytes.
    sample_rate: int | None = Field(None, alias="sampleRate", ge=4000, le=384000)


class PlayAudio(_In):
    type: Literal["playAudio"]
    data: PlayAudioData


class KillAudio(_In):
    type: Literal["killAudio"]


class MarkData(_In):
    name: str = Field(min_length=1, max_length=256)


class Mark(_In):
    type: Literal["mark"]
    data: MarkData


class ClearMarks(_In):
    type: Literal["clearMarks"]


class Disconnect(_In):
    type: Literal["disconnect"]


class Handover(_In):
    type: Literal["handover"]
    data: dict[str, Any] | None = None


class ServerError(_In):
    """The server says it cannot serve the call (an agent runtime refusing)."""

    type: Literal["error"]
    data: dict[str, Any] | None = None
    message: str | None = None


Command = Annotated[
    PlayAudio | KillAudio | Mark | ClearMarks | Disconnect | Handover | ServerError,
    Field(discriminator="type"),
]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


class BadFrame(Exception):
    """A text frame the gateway cannot use: what is wrong with it."""


def parse(text: str) -> Command:
    try:
        raw = json.loads(text)
    except ValueError:
        raise BadFrame("not JSON") from None
    if not isinstance(raw, dict):
        raise BadFrame("expected a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise BadFrame('no "type"')
    try:
        return _COMMAND.validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "union_tag_invalid":
            raise BadFrame(f"unknown type {kind!r}") from None
        where = ".".join(str(x) for x in first["loc"][1:]) or "frame"
        raise BadFrame(f"{kind}: {where}: {first['msg']}") from None


# -- gateway -> server ---------------------------------------------------------------------------
def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def dtmf(digit: str, duration_ms: int) -> str:
    return dumps({"event": "dtmf", "dtmf": digit, "duration": duration_ms})


def mark(name: str, played: bool) -> str:
    return dumps({"type": "mark", "event": "mark",
                  "data": {"name": name, "event": "playout" if played else "cleared"}})


def play_done(index: int, played: bool) -> str:
    return dumps({"type": "playDone", "event": "playDone",
                  "data": {"id": index, "completed": played}})


def error(message: str) -> str:
    return dumps({"type": "error", "event": "error", "data": {"message": message}})
