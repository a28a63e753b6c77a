"""One key press counts once, whichever way the trunk signals it."""

from __future__ import annotations


class DigitDeduper:
    """Locks onto the first DTMF method a call uses and drops the others.

    Trunks that send RFC 4733 and SIP INFO (or leave the tone in the audio) report each key press
    twice; equipment that sends one method keeps sending it. A digit from another method is
    accepted only when the locked method has been quiet for `relock_s` (a trunk that really
    switched), which is far longer than the two reports of one press are apart.
    """

    def __init__(self, relock_s: float = 2.0) -> None:
        self.method: str | None = None
        self._last_at = float("-inf")
        self._relock_s = relock_s

    def accept(self, digit: str, method: str, now: float) -> bool:
        if self.method is None or method == self.method or now - self._last_at >= self._relock_s:
            self.method = method
            self._last_at = now
            return True
        return False
