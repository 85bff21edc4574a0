"""What the REST transports (v1, v2, admin) share: the request context of an HTTP
request, body reading and JSON parsing, JSON answers, Server-Timing at the end of an
answer, and `FastRoutes`, the inference routes served as plain ASGI.

ASGI scope keys set by the direct server (serving.transport.direct_http):
- ARRIVAL: perf_counter() when the request's first bytes were read;
- WRITE: `await scope[WRITE](status, headers, body, timing)` writes a whole answer in one
  go, `timing` None or a callable giving the Server-Timing value, called last;
- TIMINGS: (stages, arrival) of the answer being sent, left by `timing_header` for WRITE.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from serving.errors import MalformedRequest, PayloadTooLarge
from serving.transport.context import (
    REQUEST_ID,
    TIMEOUT_MS,
    RequestContext,
    given_request_id,
    server_timing,
    timeout_ms,
)

ARRIVAL = "serving.arrival"
TIMINGS = "serving.timings"
WRITE = "serving.write_response"
_ORJSON = orjson.OPT_SERIALIZE_NUMPY


def context(request: Request, protocol: str) -> RequestContext:
    """The context of an inference request, its deadline header checked (400 if bad).
    Its headers are a plain dict (ASGI names are lower-case; a repeated one: the last),
    read once: the request path looks several up."""
    started = time.perf_counter()
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}
    return RequestContext(
        request_id=given_request_id(headers.get(REQUEST_ID)),
        protocol=protocol,
        headers=headers,
        started=started,
        arrived=float(request.scope.get(ARRIVAL, started)),
        lead="http",
        timeout_s=timeout_ms(headers.get(TIMEOUT_MS)),
    )


def request_id(request: Request) -> str:
    """The request's id. In either HTTP mode the header is always there (Ray Serve's
    proxy, or the direct server's RequestIdMiddleware, adds one and echoes it)."""
    return given_request_id(request.headers.get(REQUEST_ID))


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=_ORJSON),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def read_body(
    request: Request, max_bytes: int, headers: Mapping[str, str] | None = None
) -> bytes:
    """The whole body, refusing more than `max_bytes` (413) or an empty one (400).
    `headers`: the request's, when already read (RequestContext.headers)."""
    headers = request.headers if headers is None else headers
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {max_bytes}")
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise MalformedRequest(f"content-encoding {encoding!r} is not supported")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    if not body:
        raise MalformedRequest("request body is empty; expected JSON")
    return bytes(body)


def _int_or_float(literal: str) -> int | float:
    """An integer literal; one too long for 64 bits becomes a float (inf when beyond
    float range), which validation then refuses naming the field."""
    return int(literal) if len(literal) <= 18 else float(literal)


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Error path only: the stdlib parser accepts NaN/Infinity literals (as Python's
        # json.dumps writes them), so validation can name the field that holds one.
        # What orjson refuses for other reasons stays refused: nesting past the
        # recursion limit, strings with lone UTF-16 surrogates (no valid text).
        try:
            value = json.loads(body, parse_int=_int_or_float)
            json.dumps(value, allow_nan=True, ensure_ascii=False).encode()
            return value
        except (ValueError, RecursionError):  # UnicodeError is a ValueError
            raise MalformedRequest(f"body is not valid JSON: {exc}") from None


async def read_json(
    request: Request, max_bytes: int, headers: Mapping[str, str] | None = None
) -> Any:
    return parse_json(await read_body(request, max_bytes, headers))


def timing_header(
    request: Request, ctx: RequestContext, timings: dict[str, float], encode_started: float
) -> str:
    """Close the stages (RequestContext.close_stages) for the Server-Timing header. They
    stay in the scope: a server that writes the answer itself extends `encode` and
    `total` to the moment it writes and formats the header then (FastRoutes), so here it
    is left empty."""
    ctx.close_stages(timings, encode_started)
    request.scope[TIMINGS] = (timings, ctx.arrived)
    return "" if WRITE in request.scope else server_timing(timings)


FastHandler = Callable[[Request, dict[str, str]], Awaitable[Response]]
ErrorAnswer = Callable[[Request, Exception], Response]


class FastRoutes:
    """POST routes the direct HTTP server answers as plain ASGI, beside the FastAPI app
    that declares them too (for OpenAPI and for the proxy mode): the same handlers,
    without FastAPI's routing, dependency solving and middleware layers (see the
    README's benchmarks). A route's failures are answered by its `on_error`.
    `__call__` returns False for a request no route takes."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], FastHandler, ErrorAnswer]] = []

    def add(self, path: str, handler: FastHandler, on_error: ErrorAnswer) -> None:
        """`path` is a Starlette path template; a `{param}` matches `[^/]+` as there."""
        parts = re.split(r"\{(\w+)\}", path)
        rx = "".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
        self._routes.append((re.compile(f"^{rx}$"), handler, on_error))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> bool:
        if scope["method"] != "POST":
            return False
        for rx, handler, on_error in self._routes:
            if m := rx.match(scope["path"]):
                request = Request(scope, receive)
                try:
                    response = await handler(request, m.groupdict())
                except Exception as exc:
                    response = on_error(request, exc)
                await _send(scope, receive, send, response)
                return True
        return False


async def _send(scope: Any, receive: Any, send: Any, response: Response) -> None:
    write = scope.get(WRITE)
    if write is None:
        await response(scope, receive, send)
        return
    headers = [(k, v) for k, v in response.raw_headers if k != b"server-timing"]
    stamped = scope.get(TIMINGS)
    timing = None if stamped is None else _timing_at_write(*stamped)
    if response.background is None:
        await write(response.status_code, headers, response.body, timing)
    else:  # a task to run after the answer: Starlette's send runs it
        if timing is not None:
            headers.append((b"server-timing", timing()))
        response.raw_headers = headers
        await response(scope, receive, send)


def _timing_at_write(timings: dict[str, float], arrived: float) -> Callable[[], bytes]:
    """Server-Timing's value for a one-write answer, `encode` and `total` extended to
    the moment it is asked for: the writer asks last, with the rest of the response
    assembled, so only the write itself is left outside the clock. Every other stage
    is formatted here, ahead."""
    encode_before = timings["encode"] - timings["total"]  # encode = this + total
    done = server_timing({k: v for k, v in timings.items() if k not in ("encode", "total")})
    head = f"{done}, " if done else ""

    def value() -> bytes:
        total = time.perf_counter() - arrived
        encode = (encode_before + total) * 1000
        return f"{head}encode;dur={encode:.3f}, total;dur={total * 1000:.3f}".encode()

    return value


def response_bytes(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    keep_alive: bool,
    timing: Callable[[], bytes] | None = None,
) -> bytes:
    """A whole HTTP/1.1 answer, status line to body, for one write (the headers are
    ours: no validation pass; the body needs its content-length among them). `timing`
    gives the Server-Timing value, asked for once the rest is assembled."""
    content = [STATUS_LINE[status]]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    if not keep_alive:
        content.append(b"connection: close\r\n")
    if timing is not None:
        content += (b"server-timing: ", timing(), b"\r\n")
    content += (b"\r\n", body)
    return b"".join(content)
