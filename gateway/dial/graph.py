"""A dial bridge's MixGraph, which can also forget the port of a call that has ended.

When a call ends PJSIP removes its conference port and every connection of it by itself, and
its slot number may be handed to the next call's port at once: a `stopTransmit` through the
old AudioMedia (what `MixGraph.remove` / `clear` do) could then cut another call's audio.
`forget` drops the port and its edges from the graph without touching PJSIP.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from media.mixgraph import MixGraph

KEEP_S = 1.0  # a port's object outlives its last queued conference op by this much


class BridgeGraph(MixGraph):
    def forget(self, key: str) -> None:
        self._edges = {e: lv for e, lv in self._edges.items() if key not in e}
        self._ports.pop(key, None)


def keep_a_while(obj: Any) -> None:
    """Hold `obj` (a recorder, a tone) for KEEP_S: conference ops on it are queued to the
    clock thread (pjsua2 2.15), so it must not be freed right after its stopTransmit."""
    with contextlib.suppress(RuntimeError):  # no loop: nothing is queued any more either
        asyncio.get_running_loop().call_later(KEEP_S, lambda: obj)
