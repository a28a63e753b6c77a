"""When a worker calls itself overloaded (gateway/workers/lag.py)."""

from gateway.workers.lag import LagMeter


def test_one_late_tick_during_a_burst_does_not_trip() -> None:
    m = LagMeter(0.25, 0.1)
    # a burst of first prompts: one tick 400 ms late, then the loop catches up
    assert not m.tick(0.4)
    for _ in range(20):
        assert not m.tick(0.01)
    assert not m.overloaded


def test_a_loop_that_stays_behind_trips_and_clears_after_calm() -> None:
    m = LagMeter(0.25, 0.1)
    changes = [m.tick(0.2) for _ in range(3)]  # 600 ms behind within three ticks
    assert changes == [False, False, True] and m.overloaded
    for _ in range(4):
        assert not m.tick(0.05)  # calm, but not for long enough yet
    assert m.tick(0.05) and not m.overloaded
    # a new lag starts from an empty window, not from the one that tripped it
    assert not m.tick(0.3)


def test_a_lag_during_recovery_restarts_the_calm() -> None:
    m = LagMeter(0.25, 0.1)
    m.tick(1.5)
    assert m.overloaded
    for _ in range(4):
        m.tick(0.0)
    m.tick(0.2)  # late again
    for _ in range(4):
        assert not m.tick(0.0)
    assert m.tick(0.0) and not m.overloaded


def test_one_long_stall_trips_at_once() -> None:
    m = LagMeter(0.25, 0.1)
    assert m.tick(1.01) and m.overloaded


def test_limit_zero_is_off() -> None:
    m = LagMeter(0.0, 0.1)
    assert not any(m.tick(5.0) for _ in range(20))
    assert not m.overloaded
