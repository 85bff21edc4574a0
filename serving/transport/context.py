"""What every transport shares: the request context, request ids, the client's deadline
and the stage timings that leave as Server-Timing.

A transport builds one `RequestContext` per inference request (REST: `http.context`,
gRPC: `grpc.context`), hands it to the data plane with the decoded inputs, and closes
the timings with `RequestContext.close_stages` just before the answer leaves.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from serving.errors import MalformedRequest

REQUEST_ID = "x-request-id"
TIMEOUT_MS = "x-request-timeout-ms"  # lowers the deadline, never raises it
PIN = "x-serving-version"  # pins a version (arm "pinned")
# A client or a proxy in front of the gateway sets this to when it sent the request
# (nginx: `proxy_set_header X-Request-Start "t=${msec}"`), as APMs read it.
REQUEST_START = "x-request-start"
MAX_INBOUND_S = 60.0  # a later stamp is taken for a broken clock, not a slow network
CLOCK_SLACK_S = 0.001  # clocks may disagree this much: an earlier arrival counts as 0


@dataclass(slots=True)
class RequestContext:
    """One inference request as the data plane sees it, whatever the transport."""

    request_id: str  # echoed to the client (header or metadata; generated when absent)
    protocol: str  # metric label: "http" (v1 REST), "v2" (OIP REST), "grpc"
    headers: Mapping[str, str]  # HTTP headers or gRPC metadata, lower-case keys
    started: float  # perf_counter() when the transport's handler began
    # perf_counter() when the server read the request's first bytes; `started` where the
    # server cannot tell (gRPC). The `lead` stage runs from here to `started`.
    arrived: float
    lead: str | None = None  # name of that stage ("http"), or None for no such stage
    timeout_s: float | None = None  # the client's deadline, the smallest of those given
    body_id: str = ""  # an id the request body carries (OIP `id`), if any

    @property
    def record_id(self) -> str:
        """The id a prediction record is kept under (for delayed labels)."""
        return self.body_id or self.request_id

    @property
    def pinned(self) -> str | None:
        return self.headers.get(PIN)

    def lower_timeout(self, timeout_s: float | None) -> None:
        """Take another deadline the client gave (request parameters): the smallest wins."""
        if timeout_s is not None and (self.timeout_s is None or timeout_s < self.timeout_s):
            self.timeout_s = timeout_s

    def close_stages(self, timings: dict[str, float], encode_started: float) -> None:
        """Close `encode` and `total` now, and put the stages before the handler first:
        `inbound` (from the client's `x-request-start` stamp to the first read, when
        stamped) and the transport's lead stage (first read to handler)."""
        done = time.perf_counter()
        lead: dict[str, float] = {}
        inbound = inbound_s(self.headers.get(REQUEST_START), self.arrived)
        if inbound is not None:
            lead["inbound"] = inbound
        if self.lead is not None:
            lead[self.lead] = max(self.started - self.arrived, 0.0)
        timings["encode"] = done - encode_started
        timings["total"] = done - self.arrived
        if lead:
            ordered = {**lead, **timings}
            timings.clear()
            timings.update(ordered)


def server_timing(timings: Mapping[str, float]) -> str:
    """The Server-Timing value: milliseconds per stage, in order."""
    return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items())


def timeout_ms(raw: str | None) -> float | None:
    """Seconds from an `x-request-timeout-ms` value (None when absent)."""
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise MalformedRequest(
            "x-request-timeout-ms must be a number of milliseconds", field=TIMEOUT_MS
        ) from None
    if not ms > 0:
        raise MalformedRequest("x-request-timeout-ms must be positive", field=TIMEOUT_MS)
    return ms / 1000


def inbound_s(stamp: str | None, arrived: float) -> float | None:
    """Seconds from the `x-request-start` stamp to `arrived` (perf_counter() when the
    request's first bytes were read): the way in, which no clock of ours sees.

    The stamp is wall-clock time since the epoch, optionally after `t=`: seconds with a
    fraction (nginx's `$msec`), or whole milliseconds, microseconds or nanoseconds, told
    apart by magnitude. Absent, unparseable or implausible (the clocks disagree) gives
    None: the header is telemetry, never a reason to refuse a request."""
    if not stamp:
        return None
    try:
        value = float(stamp[2:] if stamp[:2] in ("t=", "T=") else stamp)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    for limit, ns_per_unit in ((1e11, 1e9), (1e14, 1e6), (1e17, 1e3)):
        if value < limit:
            value *= ns_per_unit
            break
    arrived_ns = time.time_ns() - (time.perf_counter() - arrived) * 1e9
    inbound = (arrived_ns - value) / 1e9
    if inbound < -CLOCK_SLACK_S or inbound > MAX_INBOUND_S:
        return None
    return max(inbound, 0.0)


def new_request_id() -> str:
    """A fresh request id: 128 bits from the OS's CSPRNG as 32 hex digits (the shape of
    uuid4().hex). Unguessable, not a counter: knowing one id tells nothing of another's."""
    return os.urandom(16).hex()


# The answer's feedback key (HTTP header, gRPC trailing metadata): what a delayed label
# for the answer presents (serving.observability.feedback).
FEEDBACK_KEY = "x-serving-feedback-key"

MAX_REQUEST_ID = 128
# Checked on every request (twice on the direct HTTP path): a compiled match, not a loop.
_USABLE_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")
_USABLE_ID_BYTES = re.compile(_USABLE_ID.pattern.encode())


def usable_request_id(value: str | bytes) -> bool:
    """A client's request id is echoed and stored only when short and printable ASCII
    (no spaces, no control characters): anything else is replaced by a fresh one."""
    usable = _USABLE_ID.fullmatch if isinstance(value, str) else _USABLE_ID_BYTES.fullmatch
    return usable(value) is not None  # type: ignore[arg-type]


def given_request_id(value: str | None) -> str:
    """The client's request id when usable (usable_request_id), or a fresh one."""
    return value if value and usable_request_id(value) else new_request_id()
