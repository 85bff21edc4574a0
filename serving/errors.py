"""One error hierarchy for every transport.

Each class carries its HTTP status and gRPC status code, so the HTTP handler and the
gRPC servicer each need exactly one mapping function. Client mistakes are 4xx and never
reach the generic 500 path.
"""

from __future__ import annotations

from typing import Any

import grpc

# Every HTTP error answer names its code here (ServingError.http_headers).
ERROR_CODE_HEADER = "x-serving-error-code"


class ServingError(Exception):
    """Base class: a message safe to show to clients, plus where it applies."""

    http_status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    code: str = "internal"
    retry_after_s: int | None = None  # HTTP answers carry `Retry-After` when set

    def http_headers(self) -> dict[str, str]:
        """Every HTTP error answer names its code in a header (clients and load
        balancers need not parse the body, whose format differs between v1 and v2)."""
        out = {ERROR_CODE_HEADER: self.code}
        if self.retry_after_s is not None:
            out["retry-after"] = str(self.retry_after_s)
        return out

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}

    # Errors cross Ray actor boundaries; keep them picklable with their fields.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.field))


def _rebuild(cls: type[ServingError], message: str, field: str | None) -> ServingError:
    return cls(message, field=field)


class MalformedRequest(ServingError):
    """The body is not parseable or lacks the envelope (`instances`, `inputs`)."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "malformed_request"


class InvalidInput(ServingError):
    """Well-formed body whose values do not match the model's declared inputs."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_input"


class Unauthenticated(ServingError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    code = "unauthenticated"


class Forbidden(ServingError):
    """Authenticated, or holding a credential, that does not cover this resource."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    code = "forbidden"


class NotFound(ServingError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "not_found"


class Conflict(ServingError):
    """The command does not fit the current state (e.g. a rollout already running)."""

    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    code = "conflict"


class PayloadTooLarge(ServingError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "payload_too_large"


class NotReady(ServingError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "not_ready"


class Overloaded(ServingError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "overloaded"
    retry_after_s = 1


class FeatureStoreUnavailable(ServingError):
    """Features could not be read in time and the model's policy is `reject`."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "feature_store_unavailable"


class StateStoreUnavailable(ServingError):
    """Redis, which holds rollout state, delayed labels and statistics, is down or did
    not answer in time: nothing was changed, retry."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "state_store_unavailable"
    retry_after_s = 1


class DeadlineExceeded(ServingError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "deadline_exceeded"


class ModelError(ServingError):
    """The runtime failed on input that passed validation: a server-side fault."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    code = "model_error"


def by_code(code: str) -> type[ServingError]:
    """The class whose `code` this is (ServingError itself for an unknown code): errors
    that crossed a process boundary as their code become themselves again."""
    if not _BY_CODE:
        todo: list[type[ServingError]] = [ServingError]
        while todo:
            cls = todo.pop()
            _BY_CODE.setdefault(cls.code, cls)
            todo += cls.__subclasses__()
    return _BY_CODE.get(code, ServingError)


_BY_CODE: dict[str, type[ServingError]] = {}


class ConfigError(Exception):
    """A manifest or deployment file is invalid; the message names file and field."""
