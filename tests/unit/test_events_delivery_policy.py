import pytest

from gateway.events.delivery import AttemptResult, is_permanent_status, next_delay, redact_url

FAIL = AttemptResult(False, "HTTP 500")
PERM = AttemptResult(False, "HTTP 400", permanent=True)


def nd(policy, attempts_done, result, unit=1.0):
    return next_delay(
        policy,
        attempts_done,
        result,
        backoff_unit_s=unit,
        customer_attempts=5,
        control_plane_cap_s=60.0,
    )


def test_customer_schedule_is_five_attempts_1_2_4_8():
    waits = [nd("customer", n, FAIL) for n in range(1, 6)]
    assert waits == [1, 2, 4, 8, None]
    # a permanent-looking 4xx still counts as one ordinary failed attempt for customers
    assert nd("customer", 1, PERM) == 1


def test_control_plane_backoff_capped_and_unbounded():
    waits = [nd("control_plane", n, FAIL) for n in range(1, 10)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert nd("control_plane", 10_000, FAIL) == 60
    assert nd("control_plane", 1, PERM) is None


def test_backoff_unit_scales_everything():
    assert nd("customer", 4, FAIL, unit=0.05) == pytest.approx(0.4)
    assert nd("control_plane", 50, FAIL, unit=0.05) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (400, True),
        (401, True),
        (403, True),
        (404, True),
        (410, True),
        (422, True),
        (408, False),
        (429, False),
        (500, False),
        (502, False),
        (503, False),
        (302, False),
    ],
)
def test_permanent_statuses(status, permanent):
    assert is_permanent_status(status) is permanent


def test_redact_url():
    assert redact_url("https://u:pw@h.example/hook?token=abc") == "https://h.example/hook?…"
    assert redact_url("http://127.0.0.1:8080/e") == "http://127.0.0.1:8080/e"
