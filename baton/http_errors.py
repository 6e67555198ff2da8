"""One error body for every HTTP route of both services (the orchestrator's
own API, its OpenAI-compatible one, the context store's) alike::

    {"error": {"code": "unknown_task", "message": "...", "layer": "orchestration",
               "type": "not_found_error", "param": null}}

``code`` and ``layer`` are the bus's (``proto.errors``), so a client handles a
``failed`` event and an HTTP error the same way; ``type`` and ``param`` are
what OpenAI's clients read. Validation errors, unknown routes and 401s from
the API-key check get the same body.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from proto.errors import LAYER_OF, ErrorCode
from proto.ids import ID_PATTERN, is_valid_id

log = structlog.get_logger("baton.http")

# HTTP status of an error code; anything else is 400 (the caller's fault)
# unless the code is internal.
STATUS_OF: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.TENANT_SUSPENDED: 403,
    ErrorCode.UNKNOWN_TASK: 404,
    ErrorCode.ERASED: 404,  # erased with its session or tenant
    ErrorCode.UNKNOWN_WORKFLOW: 404,
    ErrorCode.UNKNOWN_TENANT: 404,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.CANCELLED: 409,
    ErrorCode.NOT_WAITING: 409,
    ErrorCode.INPUT_TOO_LARGE: 413,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.BUDGET_EXCEEDED: 402,
    ErrorCode.RATE_LIMITED: 429,  # with Retry-After
    ErrorCode.INTERNAL: 500,
    ErrorCode.ENGINE_FAILURE: 502,
    ErrorCode.CONTEXT_UNAVAILABLE: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.STEP_TIMEOUT: 504,
}

# The code a bare HTTPException (e.g. from a shared dependency) stands for.
_CODE_OF_STATUS = {
    400: ErrorCode.INVALID_FIELD,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.UNKNOWN_TASK,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.INPUT_TOO_LARGE,
    503: ErrorCode.UNAVAILABLE,
}

_OPENAI_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    layer: str
    type: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# For route declarations: every documented failure has this body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid request"),
        (401, "Missing or unknown API key"),
        (404, "No such task or workflow"),
        (409, "Conflicts with the task's state"),
        (422, "Body or parameters fail validation"),
        (429, "Over a tenant limit; retry after Retry-After seconds"),
        (503, "Starting or stopping"),
    )
}


class ApiError(HTTPException):
    """An HTTP error with a bus error code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status or STATUS_OF.get(code, 400), message, headers=headers)
        self.code = code
        self.message = message
        self.param = param


def require_ids(**ids: str | None) -> None:
    """Refuse (400) any given id that cannot be a subject token."""
    for what, value in ids.items():
        if value is not None and not is_valid_id(value):
            raise ApiError(ErrorCode.INVALID_FIELD, f"{what} must match {ID_PATTERN}", param=what)


def error_body(
    status: int, code: ErrorCode | str, message: str, param: str | None = None
) -> dict[str, Any]:
    """The one error body (a plain dict, ready for JSON)."""
    known = code in ErrorCode.__members__.values()
    layer = LAYER_OF[ErrorCode(code)] if known else "orchestration"
    kind = _OPENAI_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": str(code), "message": message, "layer": str(layer), "type": kind,
                      "param": param}}  # fmt: skip


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, exc.code, exc.message, exc.param),
                        exc.status_code, headers=headers)  # fmt: skip


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    where = ".".join(loc) or None
    text = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{where}: {text}{more}" if where else f"{text}{more}"), where


def install(app: FastAPI) -> None:
    """Route every error of ``app`` through the one body."""

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return error_response(exc, getattr(exc, "headers", None))
        code = _CODE_OF_STATUS.get(exc.status_code)
        if code is None:
            code = ErrorCode.INTERNAL if exc.status_code >= 500 else ErrorCode.INVALID_FIELD
        message = str(exc.detail)
        if not isinstance(exc, HTTPException):  # starlette's own: an unknown path or method
            code = ErrorCode.INVALID_FIELD
            message = "no such route" if exc.status_code == 404 else message
        body = error_body(exc.status_code, code, message)
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("http_unhandled", path=request.url.path, error=repr(exc), exc_info=exc)
        return JSONResponse(error_body(500, ErrorCode.INTERNAL, "internal error"), 500)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        missing = any(e.get("type") == "missing" for e in errors[:1])
        code = ErrorCode.MISSING_FIELD if missing else ErrorCode.INVALID_FIELD
        message, param = _validation_message(errors)
        return JSONResponse(error_body(422, code, message, param), 422)
