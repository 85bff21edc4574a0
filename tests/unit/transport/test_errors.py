"""The two error mappers: every ServingError leaves with its own HTTP status and gRPC
code (one table), framework errors become ours, anything else is `internal` naming the
request id (and is logged with it)."""

from __future__ import annotations

import logging

import grpc
import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from serving import errors
from serving.errors import MalformedRequest, NotFound, ServingError
from serving.transport.errors import to_grpc, to_http


def _subclasses(cls: type[ServingError]) -> list[type[ServingError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# The gRPC code each HTTP status stands for (one table; every class must follow it).
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


EXPECTED = {
    "MalformedRequest": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidInput": grpc.StatusCode.INVALID_ARGUMENT,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "PayloadTooLarge": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "NotReady": grpc.StatusCode.UNAVAILABLE,
    "Overloaded": grpc.StatusCode.UNAVAILABLE,
    "FeatureStoreUnavailable": grpc.StatusCode.UNAVAILABLE,
    "StateStoreUnavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "ModelError": grpc.StatusCode.INTERNAL,
}


def test_every_serving_error_reaches_grpc_as_its_code_and_message() -> None:
    classes = _subclasses(ServingError)
    names = {c.__name__ for c in classes}
    assert set(EXPECTED) <= names
    for cls in classes:
        exc = cls("what went wrong", field="f")
        code, message = to_grpc(exc, "rid-1")
        assert (code, message) == (cls.grpc_code, "what went wrong"), cls
        assert code == HTTP_TO_GRPC[cls.http_status], (cls, cls.http_status, code)
        if cls.__name__ in EXPECTED:
            assert code == EXPECTED[cls.__name__], cls
    assert errors.ServingError("x").grpc_code == grpc.StatusCode.INTERNAL


def test_unexpected_errors_are_internal_with_the_request_id() -> None:
    code, message = to_grpc(KeyError("secret detail"), "rid-42")
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error (request rid-42)" and "secret" not in message


def test_framework_errors_become_ours() -> None:
    missing = to_http(HTTPException(404), "r", "GET /nowhere")
    assert isinstance(missing, NotFound) and missing.message == "no route GET /nowhere"
    refused = to_http(HTTPException(405, "Method Not Allowed"), "r")
    assert (refused.http_status, refused.code) == (405, "http_error")
    invalid = to_http(
        RequestValidationError([{"loc": ("body", "max_batch_size"), "msg": "not an int"}]), "r"
    )
    assert isinstance(invalid, MalformedRequest)
    assert invalid.field == "max_batch_size" and "not an int" in invalid.message


def test_an_unexpected_error_is_logged_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="serving.transport.errors"):
        try:
            raise KeyError("secret detail")
        except KeyError as exc:
            err = to_http(exc, "rid-7")
    assert (err.http_status, err.code) == (500, "internal")
    assert err.message == "internal error (request rid-7)"
    assert "rid-7" in caplog.text and "KeyError" in caplog.text
