"""The pure edge sets of media.mixgraph: who hears whom in a room and a bridge."""

from __future__ import annotations

import pytest

from media.mixgraph import Member, bridge_edges, room_edges


def hears(edges, who):
    return {src for src, dst in edges if dst == who}


def test_room_everyone_hears_everyone_else_once():
    e = room_edges({"a": Member(), "b": Member(), "c": Member()})
    assert hears(e, "a") == {"b", "c"} and hears(e, "b") == {"a", "c"}
    assert len(e) == 6 and all(s != d for s, d in e) and set(e.values()) == {1.0}


def test_muted_member_transmits_to_nobody_but_hears():
    e = room_edges({"a": Member(speak=False), "b": Member(), "c": Member()})
    assert all(src != "a" for src, _ in e)
    assert hears(e, "a") == {"b", "c"}
    assert hears(e, "b") == {"c"}


def test_held_member_neither_speaks_nor_hears():
    e = room_edges({"a": Member(speak=False, hear=False), "b": Member()}, links=["L"])
    assert not any("a" in edge for edge in e)
    assert e.keys() == {("b", "L"), ("L", "b")}


def test_hub_links_hear_and_speak_to_all_but_themselves():
    e = room_edges({"a": Member(), "b": Member(speak=False)}, links=["L1", "L2", "L1"])
    assert hears(e, "L1") == {"a", "L2"}  # a muted member is not forwarded either
    assert hears(e, "L2") == {"a", "L1"}
    assert hears(e, "a") == {"L1", "L2"} and hears(e, "b") == {"a", "L1", "L2"}
    assert ("L1", "L1") not in e and len(e) == len(set(e))


def test_key_both_member_and_link_is_refused():
    with pytest.raises(ValueError):
        room_edges({"a": Member()}, links=["a"])


def test_empty_and_single():
    assert room_edges({}) == {}
    assert room_edges({"a": Member()}) == {}


def test_bridge_edges_and_level():
    assert bridge_edges("a", "b", 0.5) == {("a", "b"): 0.5, ("b", "a"): 0.5}
    assert set(room_edges({"a": Member(), "b": Member()}, level=0.7).values()) == {0.7}
