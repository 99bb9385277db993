"""The API's one error shape and the exception handlers that produce it.

Every error response is ``{"error": {"code": "...", "message": "...", "details": ...}}``: a human message
and a machine-readable code. Three kinds of exception become one: ``ApiError`` (raised by the HTTP layer,
``app/api``, which knows its status), the services' domain errors (``app.domain_errors``, mapped to a
status here and nowhere else), and the engine's input errors (``finetune.errors.InputError``, 422 with the
engine's own message, so the service never rewords what the engine already explains).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.domain_errors import BadRequest, Conflict, LimitReached, NotFound, ServiceError, TooLarge
from finetune.errors import InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raise in the HTTP layer (``app/api``, the pages) to answer with ``status`` and the error shape.
    Services raise ``app.domain_errors`` instead."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


# The one place a domain error gets its HTTP status (the most specific class listed wins).
DOMAIN_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    LimitReached: 429,
}


def http_status(exc: ServiceError) -> int:
    return next((DOMAIN_STATUS[c] for c in type(exc).__mro__ if c in DOMAIN_STATUS), 400)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), exc.status, headers=exc.headers)

    @app.exception_handler(ServiceError)
    async def _domain(_: Request, exc: ServiceError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(error_body(exc.code, exc.message, exc.details), http_status(exc), headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # The client closed the connection before its body ended: nobody reads this answer, and it is
        # not the server's error (no traceback in the log).
        log.info("client disconnected during the request body of %s %s", request.method, request.url.path)
        return JSONResponse(error_body("client_disconnected", "the client closed the connection mid-body"), 400)

    @app.exception_handler(InputError)
    async def _engine_input(_: Request, exc: InputError) -> JSONResponse:
        details = getattr(exc, "problems", None)
        return JSONResponse(error_body(exc.code, str(exc), details), 422)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
        return JSONResponse(error_body("invalid", message or "invalid request", problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "internal server error"), 500)
