"""Internal HTTP API hosted by the supervisor."""

from gateway.api.app import CallControl, make_app
from gateway.api.errors import ApiError

__all__ = ["ApiError", "CallControl", "make_app"]
