"""When a worker's event loop is overloaded: the lag it accumulates, not one late tick.

A loop on a busy 2-core machine is late by a few hundred ms now and then (a burst of new calls
all rendering their first prompt) and then catches up; refusing calls on one such tick turned
away calls the node went on to hold (bench/capacity.py: 86 of 250 refused at 125 concurrent
calls, every answered call fine). What breaks calls is a loop that stays behind: prompts end
late and a caller's keys arrive before the getDigits that should read them. So the meter trips
when the lag summed over the last second of ticks passes twice the limit, or one tick stalls
for four times it, and clears after a calm half second.
"""

from __future__ import annotations

from collections import deque

WINDOW_TICKS = 10  # 1 s of 100 ms ticks
SUM_FACTOR = 2.0  # lag summed over the window, in units of the limit
STALL_FACTOR = 4.0  # one tick this late trips at once
CALM_TICKS = 5  # ticks in a row under `clear` before it clears


class LagMeter:
    def __init__(self, limit_s: float, clear_s: float) -> None:
        self.limit = limit_s
        self.clear = min(clear_s, limit_s * 0.4)
        self.overloaded = False
        self._window: deque[float] = deque(maxlen=WINDOW_TICKS)
        self._calm = 0

    def tick(self, lag: float) -> bool:
        """One tick's lag in seconds; True when the overloaded state changed."""
        if self.limit <= 0:
            return False
        self._window.append(max(lag, 0.0))
        if not self.overloaded:
            tripped = (
                lag > self.limit * STALL_FACTOR or sum(self._window) > self.limit * SUM_FACTOR
            )
            if tripped:
                self.overloaded, self._calm = True, 0
                return True
            return False
        self._calm = self._calm + 1 if lag <= self.clear else 0
        if self._calm >= CALM_TICKS:
            self.overloaded, self._calm = False, 0
            self._window.clear()
            return True
        return False
