"""Refusing a prediction before its handler runs: what a full ingress replica's HTTP
server answers by itself (serving.transport.direct_http; the limit is
serving.dataplane.admission's). 503 `overloaded` with Retry-After, in each route's error
format, echoing a usable x-request-id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from serving.errors import ERROR_CODE_HEADER, Overloaded
from serving.transport.context import REQUEST_ID, new_request_id, usable_request_id
from serving.transport.http import WRITE

_REQUEST_ID = REQUEST_ID.encode()
_ERROR_CODE, _OVERLOADED = ERROR_CODE_HEADER.encode(), Overloaded.code.encode()


class Waiting(Protocol):
    """Requests read whose handler has not started, and whether the replica is full
    (serving.dataplane.admission.Admission)."""

    waiting: int
    on_shed: Callable[[str], None] | None
    close_refused: bool

    def full(self) -> bool: ...


# Prediction routes (method POST): the model name is the group.
_PREDICT = re.compile(rb"/v1/models/([^/?]+?)(?:/versions/[^/?]+)?:predict(?:\?|$)")
_INFER = re.compile(rb"/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer(?:\?|$)")
_SHED_MESSAGE = "gateway replica at its limit of requests in flight; retry later"


_SHED_V1_BODY = json.dumps({"error": {"code": "overloaded", "message": _SHED_MESSAGE}}).encode()
_SHED_V2_BODY = json.dumps({"error": _SHED_MESSAGE}).encode()


def headers(body: bytes, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """503 `overloaded` with Retry-After, echoing a usable x-request-id."""
    rid = next((v for k, v in headers if k == _REQUEST_ID), None)
    if rid is None or not usable_request_id(rid):
        rid = new_request_id().encode()
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (_ERROR_CODE, _OVERLOADED),
        (_REQUEST_ID, rid),
    ]


def _shed_app(body: bytes) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """The same answer as an ASGI app, for a refused request pipelined behind one still
    being answered (answers leave in order)."""

    async def shed(scope: Any, receive: Any, send: Any) -> None:
        answer_headers = headers(body, scope["headers"])
        write = scope.get(WRITE)
        if write is not None:
            await write(503, answer_headers, body)
        else:
            await send({"type": "http.response.start", "status": 503, "headers": answer_headers})
            await send({"type": "http.response.body", "body": body})

    return shed


SHED_APPS = {_SHED_V1_BODY: _shed_app(_SHED_V1_BODY), _SHED_V2_BODY: _shed_app(_SHED_V2_BODY)}


def refusal_body(method: bytes, url: bytes, counter: Waiting) -> bytes | None:
    """The refusal's body when the request is a prediction (counted as shed), else None:
    only predictions are refused, never health, metadata, feedback or admin calls."""
    if method != b"POST":
        return None
    path = url.split(b"?", 1)[0]
    for pattern, body in ((_PREDICT, _SHED_V1_BODY), (_INFER, _SHED_V2_BODY)):
        m = pattern.match(path)
        if m is not None:
            if counter.on_shed is not None:
                counter.on_shed(m.group(1).decode("latin-1"))
            return body
    return None
