"""Load shedding at the ingress: inference requests in flight in this ingress replica,
all transports together (HTTP either mode, gRPC), per model. Past the limit a request
is refused at once (503 overloaded with Retry-After; gRPC UNAVAILABLE) instead of
queueing in the replica's event loop."""

from __future__ import annotations

from serving.errors import Overloaded


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight: dict[str, int] = {}  # per model; read by the in-flight gauge
        # Requests a server has read whose handler has not started yet (the direct
        # HTTP server counts them): a burst read in one loop step is known to be
        # coming before the first of it runs.
        self.waiting = 0

    def enter(self, model: str) -> None:
        """Count a request in, or raise Overloaded when the replica is at its limit."""
        if sum(self.inflight.values()) >= self.limit:
            raise Overloaded(
                f"gateway replica at its limit of {self.limit} requests in flight "
                "(ingress.max_ongoing_requests); retry later"
            )
        self.inflight[model] = self.inflight.get(model, 0) + 1

    def leave(self, model: str) -> None:
        self.inflight[model] -= 1

    def alone(self, model: str) -> bool:
        """No other request for this model is in flight here, and none is waiting to
        start."""
        return self.inflight.get(model, 0) == 1 and self.waiting <= 0
