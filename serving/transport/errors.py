"""The two error mappers: any failure → the HTTP status or gRPC status it leaves with.

A ServingError carries its own HTTP status and gRPC code (serving.errors); FastAPI's
own request errors become the matching ServingError; anything else is a server fault,
logged with the request id and answered as `internal` naming that id.
"""

from __future__ import annotations

import logging

import grpc
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import MalformedRequest, NotFound, ServingError

log = logging.getLogger(__name__)


def _classify(exc: BaseException, request_id: str, what: str = "") -> ServingError:
    """The ServingError a failure is answered as. Called inside the `except` block: an
    unexpected failure is logged here, with its traceback and the request id. `what`
    names the request, for a missing route."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return MalformedRequest(f"{where or 'body'}: {first['msg']}", field=where or None)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound(f"no route {what}".rstrip())
        err = ServingError(str(exc.detail))  # a framework refusal (e.g. 405) as it is
        err.http_status, err.code = exc.status_code, "http_error"
        return err
    log.error("unhandled error in request %s", request_id, exc_info=exc)
    return ServingError(f"internal error (request {request_id})")


def to_http(exc: BaseException, request_id: str, what: str = "") -> ServingError:
    """The error an HTTP answer describes: its `http_status`, `http_headers()`, `code`,
    `message` and `field` (each REST format writes the body its own way)."""
    return _classify(exc, request_id, what)


def to_grpc(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """(gRPC status code, message) for a failure."""
    err = _classify(exc, request_id)
    return err.grpc_code, err.message
