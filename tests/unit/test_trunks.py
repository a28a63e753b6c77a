"""The trunk pool (gateway.outbound.trunks): failover order, max_calls, max_cps, metrics; a fake
clock (plain floats) throughout."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry

from config.settings import TrunkSettings
from gateway.metrics import render
from gateway.outbound.trunks import TrunkPool, should_fail_over
from tests.unit.test_metrics import parse

DEST = "+254722000001"


def trunk(name: str, **kw: object) -> TrunkSettings:
    return TrunkSettings.model_validate({"name": name, "address": f"{name}.test:5060", **kw})


def names(pick) -> list[str]:  # type: ignore[no-untyped-def]
    return [t.trunk for t in pick.targets]


def test_configured_order_is_the_failover_order_with_rewritten_uris() -> None:
    pool = TrunkPool([
        trunk("a", strip="+254", prefix="0"),
        trunk("b", transport="tcp"),
        trunk("c"),
    ])
    p = pool.pick(DEST, now=0.0)
    assert names(p) == ["a", "b", "c"] and p.retry_in is None
    assert p.targets[0].uri == "sip:0722000001@a.test:5060"
    assert p.targets[1].uri == "sip:+254722000001@b.test:5060;transport=tcp"
    assert pool.active("a") == 1 and pool.active("b") == 0  # only the first is reserved
    assert [t.trunk for t in pool.targets(DEST)] == ["a", "b", "c"]


def test_full_trunks_are_skipped_and_come_back_when_a_call_ends() -> None:
    pool = TrunkPool([trunk("a", max_calls=1, max_cps=100), trunk("b", max_calls=1)])
    ended: list[str] = []
    pool.on_ended.append(ended.append)
    assert names(pool.pick(DEST, 0.0)) == ["a", "b"]
    assert names(pool.pick(DEST, 1.0)) == ["b"]  # a is full: b takes it, no failover left
    p = pool.pick(DEST, 2.0)
    assert p.targets == () and p.retry_in is None  # all full: wait for an end, not a time
    assert pool.targets(DEST) == []
    pool.ended("a", "answered")
    assert ended == ["a"] and pool.attempts("a") == {"answered": 1}
    assert names(pool.pick(DEST, 3.0)) == ["a"]


def test_max_cps_spaces_starts_and_says_how_long_to_wait() -> None:
    pool = TrunkPool([trunk("a", max_cps=2)])  # one start per 0.5 s
    assert names(pool.pick(DEST, 10.0)) == ["a"]
    p = pool.pick(DEST, 10.1)
    assert p.targets == () and p.retry_in == pytest.approx(0.4)
    assert pool.pick(DEST, 10.4).retry_in == pytest.approx(0.1)
    assert names(pool.pick(DEST, 10.5)) == ["a"]
    # a long idle spell does not bank more than one start (burst_s = 0)
    assert names(pool.pick(DEST, 100.0)) == ["a"]
    assert pool.pick(DEST, 100.0).retry_in == pytest.approx(0.5)
    assert pool.active("a") == 3, "rate refusals reserve nothing"


def test_a_burst_allowance_and_the_rate_over_a_long_run() -> None:
    pool = TrunkPool([trunk("a", max_cps=10)], burst_s=0.5)  # 5 at once, then 10/s
    started = [t for t in range(20) if pool.pick(DEST, 0.0).targets]
    assert len(started) == 5
    n, now = 0, 0.0
    while now < 10.0:  # ask every 10 ms for 10 s
        now += 0.01
        if pool.pick(DEST, now).targets:
            n += 1
    assert 99 <= n <= 101


def test_a_rate_limited_trunk_overflows_to_the_next_unless_told_not_to() -> None:
    pool = TrunkPool([trunk("a", max_cps=1), trunk("b", max_cps=1)])
    assert names(pool.pick(DEST, 0.0)) == ["a", "b"]
    assert names(pool.pick(DEST, 0.2)) == ["b", "a"]  # a has no token: b starts, a fails over
    p = pool.pick(DEST, 0.3)
    assert p.targets == () and p.retry_in == pytest.approx(0.7)
    pool2 = TrunkPool([trunk("a", max_cps=1), trunk("b", max_cps=1)])
    pool2.pick(DEST, 0.0)
    p = pool2.pick(DEST, 0.2, overflow=False)
    assert p.targets == () and p.retry_in == pytest.approx(0.8)


def test_acquire_for_a_failover_attempt_then_started_and_ended() -> None:
    pool = TrunkPool([trunk("a"), trunk("b", max_cps=1)])
    p = pool.pick(DEST, 0.0)
    assert names(p) == ["a", "b"]
    # a answered 503 before ringing: move the call to b
    assert should_fail_over(503, rang=False)
    pool.ended("a", "failover")
    assert pool.acquire("b", 0.1) == 0.0
    pool.started("b")
    assert pool.acquire("b", 0.2) == pytest.approx(0.9)  # b's next token
    assert (pool.active("a"), pool.active("b")) == (0, 1)
    pool.ended("b", "busy")
    assert pool.attempts("a") == {"failover": 1} and pool.attempts("b") == {"busy": 1}
    with pytest.raises(KeyError, match="unknown trunk 'z'"):
        pool.started("z")


@pytest.mark.parametrize(
    ("code", "rang", "answered", "expect"),
    [
        (503, False, False, True),  # carrier overloaded
        (408, False, False, True),  # no answer at all: trunk dead
        (477, False, False, True),  # the front could not send to the trunk
        (408, True, False, False),  # rang, then nobody answered: no_answer, not a dead trunk
        (503, True, False, False),
        (486, False, False, False),  # the callee is busy: another trunk reaches the same callee
        (404, False, False, False),
        (480, False, False, False),
        (503, False, True, False),
    ],
)
def test_should_fail_over(code: int, rang: bool, answered: bool, expect: bool) -> None:
    assert should_fail_over(code, rang=rang, answered=answered) is expect


def test_metrics_render_calls_attempts_and_skips() -> None:
    pool = TrunkPool([trunk("a", max_calls=1), trunk("b")])
    pool.record("a", "busy")  # before registration: still counted
    reg = CollectorRegistry()
    pool.register_metrics(reg)
    pool.pick(DEST, 0.0)
    pool.pick(DEST, 0.0)  # a full -> skipped, b takes it
    pool.ended("b", "weird")
    fams = parse(render(reg))
    assert fams["sautikit_trunk_calls"].get(trunk="a") == 1
    assert fams["sautikit_trunk_calls"].get(trunk="b") == 0
    attempts = fams["sautikit_trunk_attempts_total"]
    assert attempts.type == "counter"
    assert attempts.get(trunk="a", outcome="busy") == 1
    assert attempts.get(trunk="b", outcome="other") == 1
    assert len(attempts.samples) == 2
    assert fams["sautikit_trunk_skipped_total"].get(trunk="a", reason="full") == 1


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique: a"):
        TrunkPool([trunk("a"), trunk("a")])


def test_the_examples_commented_trunk_is_a_valid_trunk() -> None:
    # config/gateway.example.toml documents [[trunks]] commented out; uncommented it must load.
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml").read_text()
    block = text[text.index("# [[trunks]]") : text.index("\n[outbound]\n")]
    lines = [ln[2:] for ln in block.splitlines() if re.match(r"# (\[\[|\w+ = )", ln)]
    (entry,) = tomllib.loads("\n".join(lines))["trunks"]
    t = TrunkSettings.model_validate(entry)
    assert t.name == "carrier-a" and t.username == "acct-1234"
    assert t.request_uri("+254722000001") == "sip:254722000001@sip.carrier-a.example:5060"
