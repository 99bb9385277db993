"""What the services refuse, as exceptions that know nothing of HTTP.

Services (``app.services``) take plain values and raise these; one handler (``app.errors``) maps each kind
to its status and the API's error shape, the CLI prints the message. The job process imports services
too and must not load the web stack, so nothing here imports FastAPI or Starlette. The engine's own
input errors (``finetune.errors.InputError``) pass through unchanged and are mapped by the same handler.

    ServiceError            400 (any other refusal)
    ├── BadRequest          400
    ├── NotFound            404
    ├── Conflict            409  (the thing exists, but is in the wrong state for this)
    ├── TooLarge            413
    └── LimitReached        429  (a per-user rate or quota; ``retry_after`` in seconds when known)
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses: ``code`` for machines, the message for people, optional details."""

    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.details = details


class BadRequest(ServiceError):
    code = "bad_request"


class NotFound(ServiceError):
    code = "not_found"

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident} not found")


class Conflict(ServiceError):
    code = "conflict"


class TooLarge(ServiceError):
    code = "too_large"


class LimitReached(ServiceError):
    code = "rate_limited"

    def __init__(
        self, message: str, *, code: str | None = None, details: Any = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.retry_after = retry_after
