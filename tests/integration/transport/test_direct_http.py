"""The direct HTTP server's arrival stamp (uvicorn in this process; no Ray, no Redis).

Server-Timing's `http` stage runs from the stamp to our handler: it must start when the
request's first bytes were read, so that a request whose body comes late, or which waits
for a busy event loop, shows that time inside a stage.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from serving.transport.direct_http import DirectHttpServer
from serving.transport.http import ARRIVAL
from tests.conftest import free_port


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the arrival stamp and when the handler got the whole body."""
    while (await receive()).get("more_body", False):
        pass
    body = json.dumps({"arrival": scope[ARRIVAL], "handler": time.perf_counter()}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def exchange(port: int, parts: list[bytes], pause_s: float) -> tuple[float, dict[str, Any]]:
    """Send a request in parts with a pause between them; returns when the first part
    was written and the decoded answer (plus its x-request-id)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        first_sent = time.perf_counter()
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        body = await reader.readexactly(int(headers[b"content-length"]))
        out: dict[str, Any] = json.loads(body)
        out["rid"] = headers.get(b"x-request-id")
        return first_sent, out
    finally:
        writer.close()


async def test_arrival_is_when_the_first_bytes_were_read() -> None:
    server = DirectHttpServer(app, "127.0.0.1", free_port())
    await server.start()
    try:
        # uvicorn calls the app once the headers are complete: split them, so that a
        # stamp taken by the app (or middleware) would come a pause too late.
        line, rest = b"POST /x HTTP/1.1\r\nhost: t\r\n", b"content-length: 4\r\n\r\n"
        sent, got = await exchange(server.port, [line, rest, b"abcd"], pause_s=0.1)
        # The stamp is the first read, not the handler's start after the late parts.
        assert sent <= got["arrival"] < sent + 0.05
        assert got["handler"] - got["arrival"] >= 0.19
        assert got["rid"]  # the middleware still adds a request id
        # A second request on a new connection gets its own stamp.
        sent2, got2 = await exchange(server.port, [line + rest + b"abcd"], pause_s=0)
        assert sent2 <= got2["arrival"] < sent2 + 0.05 and got2["arrival"] > got["handler"]
    finally:
        await server.stop()


async def test_fast_routes_take_only_their_post_paths() -> None:
    from fastapi.responses import Response

    from serving.transport.http import FastRoutes
    from serving.transport.rest_v1 import PREDICT, PREDICT_VERSION
    from serving.transport.rest_v2 import INFER

    seen: list[tuple[str, dict[str, str]]] = []

    def handler(tag: str) -> Any:
        async def answer(request: Any, params: dict[str, str]) -> Response:
            seen.append((tag, params))
            return Response(b"ok")

        return answer

    def on_error(request: Any, exc: Exception) -> Response:
        raise AssertionError(f"no route here fails: {exc!r}")

    fast = FastRoutes()
    fast.add(PREDICT, handler("v1"), on_error)
    fast.add(PREDICT_VERSION, handler("v1-version"), on_error)
    fast.add(INFER, handler("v2"), on_error)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def take(method: str, path: str) -> bool:
        scope = {"type": "http", "method": method, "path": path, "headers": []}
        return await fast(scope, receive, send)

    assert await take("POST", "/v1/models/fraud:predict")
    assert await take("POST", "/v1/models/fraud/versions/v2:predict")
    assert await take("POST", "/v2/models/digits/infer")
    assert seen == [
        ("v1", {"name": "fraud"}),
        ("v1-version", {"name": "fraud", "version": "v2"}),
        ("v2", {"name": "digits"}),
    ]
    # Anything else is left to FastAPI.
    assert not await take("GET", "/v1/models/fraud:predict")
    assert not await take("POST", "/v1/models/a/b:predict")
    assert not await take("POST", "/v1/models/fraud:predicted")
    assert not await take("POST", "/v1/feedback")
    assert len(seen) == 3 and sent[0]["status"] == 200


class _FastApp:
    """An ASGI app with a fast path, as serving.transport.http_app.build_http_app makes one."""

    def __init__(self) -> None:
        from fastapi.responses import Response

        from serving.transport.http import FastRoutes, context, timing_header
        from serving.transport.rest_v1 import error_response

        async def answer(request: Any, params: dict[str, str]) -> Response:
            ctx = context(request, "http")
            body = await request.body()
            t_enc = time.perf_counter()
            timings = {"decode": 0.0}
            response = Response(b'{"echo":"' + body + b'"}', media_type="application/json")
            response.headers["server-timing"] = timing_header(request, ctx, timings, t_enc)
            return response

        self.state = type("State", (), {})()
        self.state.fast_path = FastRoutes()
        self.state.fast_path.add("/echo/{name}", answer, error_response)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
    body = await reader.readexactly(int(headers[b"content-length"]))
    return lines[0], headers, body


async def test_fast_route_answers_in_one_write_on_a_kept_alive_connection() -> None:
    server = DirectHttpServer(_FastApp(), "127.0.0.1", free_port())
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(3):  # keep-alive: the connection serves one request after another
            sent = time.perf_counter()
            body = b"x%d" % i
            writer.write(
                b"POST /echo/a HTTP/1.1\r\nhost: t\r\nx-request-id: r%d\r\n"
                b"content-length: %d\r\n\r\n" % (i, len(body)) + body
            )
            status, headers, got = await read_answer(reader)
            took_ms = (time.perf_counter() - sent) * 1000
            assert status == b"HTTP/1.1 200 OK" and got == b'{"echo":"x%d"}' % i
            assert headers[b"x-request-id"] == b"r%d" % i
            assert headers[b"content-type"] == b"application/json" and b"date" in headers
            stages = dict(
                part.strip().split(b";dur=") for part in headers[b"server-timing"].split(b",")
            )
            # `total` runs from the first read to just before the write: within the
            # client's own measurement, and it includes every stage.
            total = float(stages.pop(b"total"))
            assert sum(float(v) for v in stages.values()) <= total + 1e-3 < took_ms
        # A request asking to close gets its answer, then the connection closes.
        writer.write(
            b"POST /echo/b HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 1\r\n\r\nz"
        )
        status, headers, got = await read_answer(reader)
        assert got == b'{"echo":"z"}' and headers[b"connection"] == b"close"
        assert await reader.read() == b""
        writer.close()
        # Other requests still go to the app.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /echo/a HTTP/1.1\r\nhost: t\r\n\r\n")
        status, _, _ = await read_answer(reader)
        assert status == b"HTTP/1.1 404 Not Found"
        writer.close()
    finally:
        await server.stop()


async def test_requests_read_together_are_counted_as_waiting_until_their_handler_starts() -> None:
    class Counter:
        waiting = 0
        on_shed = None
        close_refused = False

        def full(self) -> bool:
            return False

    counter = Counter()
    seen: list[int] = []

    async def counting_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(counter.waiting)  # how many others were read and wait to start
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    server = DirectHttpServer(counting_app, "127.0.0.1", free_port(), counter)
    await server.start()
    try:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(16)]
        request = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"
        for _, writer in conns:  # all at once: the server reads them in one step
            writer.write(request)
        await asyncio.gather(*(w.drain() for _, w in conns))
        for reader, writer in conns:
            await read_answer(reader)
            writer.close()
        assert len(seen) == 16 and max(seen) >= 1  # the first saw others waiting
        assert counter.waiting == 0  # every one was counted out
        # A lone request sees nobody waiting.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        await read_answer(reader)
        writer.close()
        assert seen[-1] == 0 and counter.waiting == 0
    finally:
        await server.stop()


# ---- connection limits and draining --------------------------------------------------
async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection (fails past `seconds`)."""
    t0 = time.monotonic()
    assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - t0


async def test_slow_and_idle_connections_are_closed() -> None:
    from serving.transport.direct_http import ConnectionLimits

    limits = ConnectionLimits(read_s=0.5, idle_s=1.0, drain_s=2.0)
    server = DirectHttpServer(app, "127.0.0.1", free_port(), limits=limits)
    await server.start()
    try:
        head = b"POST /x HTTP/1.1\r\nhost: t\r\n"
        for send in (
            b"",  # connected, never sends
            head,  # slowloris: headers never finish
            head + b"content-length: 100\r\n\r\n" + b"x" * 10,  # a body shorter than said
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(send)
            assert 0.4 < await _closed_within(reader, 2.0) < 1.0, send
            writer.close()
        # Idle after an answer: the keep-alive limit.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head + b"content-length: 0\r\n\r\n")
        await reader.readuntil(b"}")
        assert 0.8 < await _closed_within(reader, 3.0) < 2.0
        writer.close()
    finally:
        await server.stop()


async def slow_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await asyncio.sleep(0.4)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def test_stopping_answers_every_request_read_and_refuses_new_connections() -> None:
    server = DirectHttpServer(slow_app, "127.0.0.1", free_port())
    await server.start()
    port = server.port
    request = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"

    async def answer(reader: asyncio.StreamReader) -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await reader.readexactly(2) == b"ok"
        return head.lower()

    busy = await asyncio.open_connection("127.0.0.1", port)
    idle = await asyncio.open_connection("127.0.0.1", port)
    idle[1].write(request)
    assert b"connection: close" not in await answer(idle[0])  # kept alive, now idle
    busy[1].write(request)  # in flight when the server stops
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.3)
    # The listener is closed: a new connection is refused (a client tries elsewhere)...
    try:
        await asyncio.open_connection("127.0.0.1", port)
        raise AssertionError("a stopping server accepted a new connection")
    except OSError:
        pass
    # ...while a request on an idle connection, on its way as the server stopped, and
    # the one in flight are both answered, each with Connection: close.
    idle[1].write(request)
    assert b"connection: close" in await answer(busy[0])
    assert b"connection: close" in await answer(idle[0])
    for reader, _ in (busy, idle):
        assert await asyncio.wait_for(reader.read(), 2) == b""
    await stopping
    assert time.monotonic() - t0 < 2.0
    for _, writer in (busy, idle):
        writer.close()


async def test_a_full_replica_refuses_predictions_before_their_handler() -> None:
    """While admission says full, the server answers predictions 503 itself (in each
    route's error format, with Retry-After), counts them, and keeps the connection;
    everything else still reaches the app."""

    class Full:
        def __init__(self) -> None:
            self.waiting = 0
            self.shed: list[str] = []
            self.on_shed = self.shed.append
            self.is_full = True
            self.close_refused = False

        def full(self) -> bool:
            return self.is_full

    handled: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        handled.append(scope["path"])
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    counter = Full()
    server = DirectHttpServer(app, "127.0.0.1", free_port(), counter)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def ask(
            method: str, path: str, body: bytes = b"{}"
        ) -> tuple[bytes, dict[bytes, bytes], bytes]:
            head = f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n"
            writer.write(head.encode() + b"x-request-id: mine\r\n\r\n" + body)
            return await read_answer(reader)

        status, headers, body = await ask("POST", "/v1/models/fraud:predict")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"mine"
        assert headers[b"x-serving-error-code"] == b"overloaded"
        assert json.loads(body)["error"]["code"] == "overloaded"
        status, _, body = await ask("POST", "/v2/models/digits/versions/v1/infer?x=1")
        assert status.endswith(b"503 Service Unavailable")
        assert "limit" in json.loads(body)["error"]
        assert counter.shed == ["fraud", "digits"] and handled == []
        for method, path in (
            ("GET", "/healthz"),
            ("POST", "/v1/feedback"),
            ("GET", "/v2/models/digits"),
        ):
            status, _, _ = await ask(method, path)
            assert status.endswith(b"200 OK"), path
        # Pipelined behind a request being answered: refused in its turn.
        writer.write(
            b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
            b"POST /v1/models/fraud:predict HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"
        )
        assert (await read_answer(reader))[0].endswith(b"200 OK")
        assert (await read_answer(reader))[0].endswith(b"503 Service Unavailable")
        assert handled.pop() == "/healthz"
        counter.is_full = False
        status, _, _ = await ask("POST", "/v1/models/fraud:predict")
        assert status.endswith(b"200 OK")
        assert handled == [
            "/healthz",
            "/v1/feedback",
            "/v2/models/digits",
            "/v1/models/fraud:predict",
        ]
        # With other ingress replicas on the port, a refusal closes its connection: the
        # client connects again, perhaps to a replica with room.
        counter.is_full = counter.close_refused = True
        status, headers, _ = await ask("POST", "/v1/models/fraud:predict")
        assert status.endswith(b"503 Service Unavailable") and headers[b"connection"] == b"close"
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
    finally:
        await server.stop()
