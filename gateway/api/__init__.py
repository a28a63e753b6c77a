"""Internal HTTP API hosted by the supervisor."""

from gateway.api.app import CallRegistry, make_app
from gateway.api.errors import ApiError

__all__ = ["ApiError", "CallRegistry", "make_app"]
