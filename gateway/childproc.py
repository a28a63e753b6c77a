"""What the node's child daemons (Kamailio, rtpengine) share: they die with the supervisor."""

from __future__ import annotations

import contextlib
import signal


def die_with_parent() -> None:
    """`preexec_fn` of a child daemon (runs between fork and exec): SIGTERM when the
    supervisor dies, so no Kamailio or rtpengine outlives its node and holds its ports."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
