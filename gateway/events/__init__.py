"""The durable event path: envelope, signatures, SQLite outbox, HTTP delivery."""

from gateway.events.delivery import Deliverer
from gateway.events.envelope import Event, make_event, rfc3339_ms, uuid7
from gateway.events.outbox import AsyncOutbox, Outbox, OutboxRow, Policy
from gateway.events.signing import SignatureError, sign, verify

__all__ = [
    "AsyncOutbox",
    "Deliverer",
    "Event",
    "Outbox",
    "OutboxRow",
    "Policy",
    "SignatureError",
    "make_event",
    "rfc3339_ms",
    "sign",
    "uuid7",
    "verify",
]
