"""Which trunks an outbound call tries, and when it may start: pure logic, owned by the supervisor.

`TrunkPool(settings.trunks)` keeps, per trunk, its calls in progress (`max_calls`) and a token
bucket for `max_cps`. `pick(e164, now)` is the usual entry: the first trunk, in configured order,
that is neither full nor rate limited right now gets the call (a start token and a call are
reserved on it), and the other trunks that are not full follow it in configured order as the
failover list. When none can take a call now, `Pick.retry_in` says when to ask again (a rate
token frees), or None when every trunk is at `max_calls` (ask again after an `ended`).

The caller owns the clock (`now`: time.monotonic() or the loop's time; tests use a fake) and
reports what happened: `started`/`ended` for every call placed on a trunk (including failover
attempts), `record` for each attempt's outcome (/metrics). `should_fail_over` is the rule for
trying the next trunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from config.settings import TrunkSettings
from gateway.control.originate import TrunkTarget
from gateway.metrics import GaugeFn

__all__ = [
    "FAILOVER_CODES",
    "OUTCOMES",
    "Pick",
    "TrunkPool",
    "TrunkStatus",
    "should_fail_over",
]

# Final answers that mean "this trunk cannot carry the call now", when nothing rang first:
# 503 (the carrier is overloaded, or PJSIP's own code for a transport error), 408 (no answer
# at all: the front's or PJSIP's timer), 477 (Kamailio could not send to the trunk).
FAILOVER_CODES = frozenset({408, 477, 503})

# Outcome labels of `record` (bounded: anything else counts as "other").
OUTCOMES = ("answered", "busy", "no_answer", "failed", "canceled", "failover")


def should_fail_over(sip_code: int, *, rang: bool, answered: bool = False) -> bool:
    """Try the next trunk? Only for a trunk-level failure (FAILOVER_CODES) before the callee
    was reached: a 408 after 180 Ringing is the callee not answering, not a dead trunk."""
    return not answered and not rang and sip_code in FAILOVER_CODES


@dataclass(frozen=True)
class Pick:
    """`targets[0]` has a start token and a call reserved; the rest are failovers (nothing
    reserved on them: `started` them when a call moves there). Empty: nothing can start now."""

    targets: tuple[TrunkTarget, ...]
    # With no targets: seconds until a rate token frees on a trunk that is not full; None when
    # every trunk is at max_calls (wait for an `ended`).
    retry_in: float | None = None


@dataclass(frozen=True)
class TrunkStatus:
    name: str
    active: int
    max_calls: int  # 0: no limit
    max_cps: float


@dataclass
class _Bucket:
    """Token bucket: `rate` tokens per second, at most `burst` kept."""

    rate: float
    burst: float
    tokens: float
    last: float | None = None

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: now); takes nothing."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take a token if one is available (0.0), else the seconds until one is."""
        w = self.wait(now)
        if w == 0.0:
            self.tokens -= 1.0
        return w


@dataclass
class _Trunk:
    settings: TrunkSettings
    bucket: _Bucket
    active: int = 0
    attempts: dict[str, int] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return self.settings.max_calls > 0 and self.active >= self.settings.max_calls


class TrunkPool:
    """The node's trunks in failover order, with their limits. Not thread-safe: one owner
    (the supervisor's event loop)."""

    def __init__(self, trunks: Sequence[TrunkSettings], *, burst_s: float = 0.0) -> None:
        """`burst_s`: seconds of calls a trunk may start at once after an idle spell (tokens
        kept: max(1, max_cps * burst_s)); 0 spaces every start by 1/max_cps."""
        names = [t.name for t in trunks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"trunk names must be unique: {', '.join(dupes)}")
        self._trunks: dict[str, _Trunk] = {}
        for t in trunks:
            burst = max(1.0, t.max_cps * burst_s)
            self._trunks[t.name] = _Trunk(t, _Bucket(t.max_cps, burst, burst))
        self.on_ended: list[Callable[[str], None]] = []  # e.g. wake a queue waiting for room
        self._attempts: Counter | None = None
        self._skipped: Counter | None = None
        # Series by (trunk, outcome or reason): bounded sets (the configured trunks, OUTCOMES,
        # full|rate), so each child is looked up once and kept.
        self._attempt_series: dict[tuple[str, str], Counter] = {}
        self._skip_series: dict[tuple[str, str], Counter] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._trunks)

    def __len__(self) -> int:
        return len(self._trunks)

    def settings(self, trunk: str) -> TrunkSettings:
        return self._get(trunk).settings

    def target(self, trunk: str, e164: str) -> TrunkTarget:
        t = self._get(trunk).settings
        return TrunkTarget(trunk=t.name, uri=t.request_uri(e164))

    def targets(self, e164: str) -> list[TrunkTarget]:
        """Every trunk not at max_calls, in configured (failover) order; nothing reserved."""
        return [self.target(n, e164) for n, t in self._trunks.items() if not t.full]

    def active(self, trunk: str) -> int:
        return self._get(trunk).active

    def status(self) -> list[TrunkStatus]:
        return [
            TrunkStatus(n, t.active, t.settings.max_calls, t.settings.max_cps)
            for n, t in self._trunks.items()
        ]

    def attempts(self, trunk: str) -> dict[str, int]:
        return dict(self._get(trunk).attempts)

    # -- reservations -------------------------------------------------------------------------
    def pick(self, e164: str, now: float, *, overflow: bool = True) -> Pick:
        """Reserve a start on the first trunk that can take a call now; the others not full
        follow as failovers. See `Pick`. `overflow=False`: a rate-limited first trunk (the
        first not full) is waited for instead of passing the call to the next one."""
        chosen: str | None = None
        soonest: float | None = None
        for name, t in self._trunks.items():
            if t.full:
                self._skip(name, "full")
                continue
            wait = t.bucket.take(now)
            if wait == 0.0:
                chosen = name
                break
            self._skip(name, "rate")
            soonest = wait if soonest is None else min(soonest, wait)
            if not overflow:
                break
        if chosen is None:
            return Pick((), soonest)
        self.started(chosen)
        rest = [n for n, t in self._trunks.items() if n != chosen and not t.full]
        return Pick(tuple(self.target(n, e164) for n in [chosen, *rest]))

    def acquire(self, trunk: str, now: float) -> float:
        """A start token on `trunk`: 0.0 when taken, else seconds until one frees (nothing
        taken). For a failover attempt; `pick` takes the first trunk's itself."""
        return self._get(trunk).bucket.take(now)

    def started(self, trunk: str) -> None:
        """A call is placed on (or reserved for) `trunk`."""
        self._get(trunk).active += 1

    def ended(self, trunk: str, outcome: str | None = None) -> None:
        """That call is over on `trunk` (or moved to the next trunk: outcome "failover").
        With an outcome, it is also `record`ed."""
        t = self._get(trunk)
        t.active = max(0, t.active - 1)
        if outcome is not None:
            self.record(trunk, outcome)
        for cb in self.on_ended:
            cb(trunk)

    def record(self, trunk: str, outcome: str) -> None:
        """Count one attempt's outcome on `trunk` (OUTCOMES; others count as "other")."""
        label = outcome if outcome in OUTCOMES else "other"
        t = self._get(trunk)
        t.attempts[label] = t.attempts.get(label, 0) + 1
        if self._attempts is not None:
            _series(self._attempts, self._attempt_series, trunk, label).inc()

    # -- metrics ------------------------------------------------------------------------------
    def register_metrics(self, registry: CollectorRegistry) -> None:
        """sautikit_trunk_calls{trunk} (in progress), sautikit_trunk_attempts_total{trunk,
        outcome}, sautikit_trunk_skipped_total{trunk,reason}: full or rate limited at a pick."""
        registry.register(GaugeFn(
            "sautikit_trunk_calls",
            "Outbound calls in progress (or reserved) per trunk.",
            lambda: [({"trunk": n}, float(t.active)) for n, t in self._trunks.items()],
        ))
        self._attempts = Counter(
            "sautikit_trunk_attempts_total",
            "Outbound call attempts per trunk, by outcome (failover: moved to the next trunk).",
            ("trunk", "outcome"),
            registry=registry,
        )
        self._skipped = Counter(
            "sautikit_trunk_skipped_total",
            "Times a trunk was passed over for a new call: full (max_calls) or rate (max_cps).",
            ("trunk", "reason"),
            registry=registry,
        )
        for name, t in self._trunks.items():  # attempts recorded before registration
            for outcome, n in t.attempts.items():
                _series(self._attempts, self._attempt_series, name, outcome).inc(n)

    def _skip(self, trunk: str, reason: str) -> None:
        if self._skipped is not None:
            _series(self._skipped, self._skip_series, trunk, reason).inc()

    def _get(self, trunk: str) -> _Trunk:
        try:
            return self._trunks[trunk]
        except KeyError:
            raise KeyError(f"unknown trunk {trunk!r} (configured: {', '.join(self._trunks)})"
                           ) from None


def _series(family: Counter, kept: dict[tuple[str, str], Counter], trunk: str, label: str
            ) -> Counter:
    child = kept.get((trunk, label))
    if child is None:
        child = kept[(trunk, label)] = family.labels(trunk, label)
    return child
