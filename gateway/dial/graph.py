"""A dial bridge's MixGraph, which can also forget the port of a call that has ended.

When a call ends PJSIP removes its conference port and every connection of it by itself, and
its slot number may be handed to the next call's port at once: a `stopTransmit` through the
old AudioMedia (what `MixGraph.remove` / `clear` do) could then cut another call's audio.
`forget` drops the port and its edges from the graph without touching PJSIP.
"""

from __future__ import annotations

from media.mixgraph import MixGraph

# A port's object outlives its last queued conference op (pjsua2 2.15 queues them to the
# clock thread) by this much.
KEEP_S = 1.0


class BridgeGraph(MixGraph):
    def forget(self, key: str) -> None:
        self._edges = {e: lv for e, lv in self._edges.items() if key not in e}
        self._ports.pop(key, None)
