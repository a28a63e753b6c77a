"""Operator views of the outbox, for `sautikit-gateway events --dead / --retry ID`."""

from __future__ import annotations

from gateway.events.delivery import redact_url
from gateway.events.outbox import Outbox


def format_dead_letters(outbox: Outbox) -> str:
    """One tab-separated line per dead letter (empty string when there are none):
    row id, event_id, kind, call_id, attempts, last_error, url (credentials/query redacted)."""
    lines = []
    for r in outbox.dead_letters():
        error = " ".join((r.last_error or "").split()) or "-"
        lines.append(
            f"{r.id}\t{r.event_id}\t{r.kind}\t{r.call_id or '-'}\t"
            f"attempts={r.attempts}\t{error}\t{redact_url(r.url)}"
        )
    return "\n".join(lines)


def retry_dead_letter(outbox: Outbox, ident: str) -> str:
    """Re-queue a dead letter by row id or event_id; KeyError if no such row."""
    row = outbox.get(ident)
    if row is None:
        raise KeyError(ident)
    if row.state != "dead_letter":
        return f"row {row.id} (event {row.event_id}) is {row.state}, not dead_letter: unchanged"
    if not outbox.retry(row.id):
        return f"row {row.id} (event {row.event_id}) changed state meanwhile: unchanged"
    return f"row {row.id} (event {row.event_id}, {row.kind}) re-queued for delivery"
