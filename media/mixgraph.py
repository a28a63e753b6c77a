"""Who hears whom among the ports of this worker's conference bridge: one declarative graph.

A `MixGraph` knows ports by key (a call's audio media, a media link, a tone, a recorder) and a
set of one-way edges `(src, dst) -> level`; `set_edges` applies the difference with
`startTransmit` / `startTransmit2` (a level other than 1.0) / `stopTransmit`. A dial bridge, a
conference room's local part, a supervision tap and a recording are each an edge set; whoever
owns the worker's graph unions them and calls `set_edges` once per change.

pjsua2 queues connect/disconnect to the clock thread (2.15): the calls return at once and take
effect on the next tick, in the order they were made. All methods run on the asyncio thread.

`room_edges` and `bridge_edges` are pure: they say which edges a room or a two-party bridge
wants, and are unit-tested without pjsua2.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Edge = tuple[str, str]


@dataclass(frozen=True)
class Member:
    """A room participant as the mix sees it. speak=False (muted or held): transmits to nobody;
    hear=False (held): hears nobody in the room."""

    speak: bool = True
    hear: bool = True


def room_edges(members: Mapping[str, Member], links: Iterable[str] = (),
               level: float = 1.0) -> dict[Edge, float]:
    """Every port hears every other port of the room, except itself: members by their flags,
    links always (a link hears and speaks for the worker at its other end; a hub forwards link
    to link, so a tree of workers is one room)."""
    link_keys = list(dict.fromkeys(links))
    clash = set(link_keys) & set(members)
    if clash:
        raise ValueError(f"keys both member and link: {sorted(clash)}")
    speakers = [k for k, m in members.items() if m.speak] + link_keys
    hearers = [k for k, m in members.items() if m.hear] + link_keys
    return {(s, h): level for s in speakers for h in hearers if s != h}


def bridge_edges(a: str, b: str, level: float = 1.0) -> dict[Edge, float]:
    """A two-party bridge: each hears the other."""
    return {(a, b): level, (b, a): level}


class MixGraphError(Exception):
    """Some edges could not be applied (`failed`: edge -> PJSIP's message)."""

    def __init__(self, failed: dict[Edge, str]) -> None:
        super().__init__(f"{len(failed)} edge(s) failed: {failed}")
        self.failed = failed


class MixGraph:
    """Ports by key and the one-way edges between them (levels 0.0-... ; 1.0 = as is)."""

    def __init__(self) -> None:
        self._ports: dict[str, Any] = {}  # key -> pj.AudioMedia (kept referenced here)
        self._edges: dict[Edge, float] = {}

    @property
    def edges(self) -> dict[Edge, float]:
        """The edges in place (a copy)."""
        return dict(self._edges)

    @property
    def keys(self) -> list[str]:
        return list(self._ports)

    def __contains__(self, key: object) -> bool:
        return key in self._ports

    def port(self, key: str) -> Any:
        return self._ports[key]

    def add(self, key: str, audio_media: Any) -> None:
        """Add a port. Adding a key again with another AudioMedia (a call whose media was
        renegotiated) moves its edges to the new one."""
        old = self._ports.get(key)
        if old is audio_media:
            return
        mine = {e: lv for e, lv in self._edges.items() if key in e}
        if old is not None:
            for edge in mine:
                self._stop(edge)
        self._ports[key] = audio_media
        failed: dict[Edge, str] = {}
        for edge, lv in mine.items():
            self._start(edge, lv, failed)
        if failed:
            raise MixGraphError(failed)

    def remove(self, key: str) -> None:
        """Stop every edge touching `key`, then forget the port."""
        if key not in self._ports:
            return
        for edge in [e for e in self._edges if key in e]:
            self._stop(edge)
        del self._ports[key]

    def set_edges(self, edges: Mapping[Edge, float]) -> None:
        """Make the graph's edges exactly `edges`: stop the ones not wanted, start the new,
        restart those whose level changed. Unknown keys or self edges: ValueError (nothing
        applied). PJSIP refusals (a call whose media is gone): the other edges are applied,
        then MixGraphError names the failed ones (not kept in `edges`)."""
        for src, dst in edges:
            if src == dst:
                raise ValueError(f"self edge {src!r}")
            for k in (src, dst):
                if k not in self._ports:
                    raise ValueError(f"unknown port {k!r}")
        for edge in [e for e in self._edges if e not in edges]:
            self._stop(edge)
        failed: dict[Edge, str] = {}
        for edge, lv in edges.items():
            cur = self._edges.get(edge)
            if cur == lv:
                continue
            if cur is not None:
                # A connection's level is set when it is made: remake it (both queued, in
                # order, so no tick passes between them).
                self._stop(edge)
            self._start(edge, lv, failed)
        if failed:
            raise MixGraphError(failed)

    def clear(self) -> None:
        for edge in list(self._edges):
            self._stop(edge)
        self._ports.clear()

    # -- pjsua2 ---------------------------------------------------------------------------
    def _start(self, edge: Edge, level: float, failed: dict[Edge, str]) -> None:
        import pjsua2 as pj

        src, dst = self._ports[edge[0]], self._ports[edge[1]]
        try:
            if level == 1.0:
                src.startTransmit(dst)
            else:
                prm = pj.AudioMediaTransmitParam()
                prm.level = float(level)
                src.startTransmit2(dst, prm)
        except pj.Error as e:
            failed[edge] = e.info()
            return
        self._edges[edge] = level

    def _stop(self, edge: Edge) -> None:
        import pjsua2 as pj

        self._edges.pop(edge, None)
        src, dst = self._ports[edge[0]], self._ports[edge[1]]
        with contextlib.suppress(pj.Error):  # the call's media is gone: so is the edge
            src.stopTransmit(dst)
