"""Errors raised by the media layer.

`media` never imports `dsl`; the gateway adapts `PromptError` to `dsl.context.MediaError`
(same `code` and `message`).
"""

from __future__ import annotations

from typing import Literal

PromptErrorCode = Literal[
    "tts_failed", "media_fetch_failed", "media_decode_failed", "url_forbidden"
]


class PromptError(Exception):
    """A prompt could not be produced.

    `code`: `tts_failed`, `media_fetch_failed`, `media_decode_failed`, `url_forbidden`.
    """

    def __init__(self, code: PromptErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: PromptErrorCode = code
        self.message = message
