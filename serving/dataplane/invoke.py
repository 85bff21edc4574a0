"""Calling a model version: in this process (fused) or on its replicas, under a
deadline, with every failure mapped to a ServingError here and only here.

Predictions for a version on replicas go over the direct channel (serving.dataplane.
channel) once Serve has said where its replicas are; until then, and for everything
else (readiness, batching), through the version's Serve handle. Either way a request
whose replica died before answering is sent once more (predictions are idempotent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serving.dataplane.channel import DirectChannel
from serving.dataplane.replicas import ReplicaWatch
from serving.errors import DeadlineExceeded, ModelError, NotReady, Overloaded, ServingError


class ReplicaHandle(Protocol):
    """The part of a Ray Serve DeploymentHandle used here."""

    def __getattr__(self, method: str) -> Any: ...


HandleFactory = Callable[[str, str], ReplicaHandle]


class VersionCaller:
    """`call(model, version, method, timeout_s, *args)`: a ModelWorker method's result.

    Fused versions are ModelWorkers in this process, called without a Ray hop; any
    other version is reached over the direct channel (predictions, when `watch` is
    given) or through its deployment's handle (made once, on first use).
    """

    def __init__(
        self,
        handles: HandleFactory,
        local: Mapping[tuple[str, str], Any],
        watch: ReplicaWatch | None = None,
    ) -> None:
        self._factory = handles
        self._handles: dict[tuple[str, str], ReplicaHandle] = {}
        self._local = dict(local)
        self._watch = watch
        self.channel = DirectChannel()

    def is_local(self, model: str, version: str) -> bool:
        return (model, version) in self._local

    async def call(
        self, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        if timeout_s <= 0:
            raise DeadlineExceeded("deadline exceeded before the model was called")
        local = self._local.get((model, version))
        if local is not None:
            return await self._call_local(local, model, version, method, timeout_s, *args)
        if method == "predict" and self._direct(model, version):
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.channel.predict(
                        model, version, args[0], bool(args[1:] and args[1]), timeout_s
                    )
            except TimeoutError:
                raise _late(model, version, timeout_s) from None
        end = time.monotonic() + timeout_s
        try:
            return await self._call_handle(model, version, method, timeout_s, *args)
        except RayActorError:
            if method != "predict" or end - time.monotonic() <= 0:
                raise NotReady(f"{model}/{version} replica died; retry") from None
        # The replica died with the request on it: once more, in what is left of the
        # deadline (Serve's router has dropped that replica by now).
        try:
            return await self._call_handle(model, version, method, end - time.monotonic(), *args)
        except RayActorError:
            raise NotReady(f"{model}/{version} replica died; retry") from None

    def close(self) -> None:
        """Stop following replicas and close the direct channel's connections."""
        if self._watch is not None:
            self._watch.stop()
        self.channel.close()

    def channel_state(self, model: str, version: str) -> dict[str, Any]:
        """How this ingress reaches the version: in process, direct, or a Serve handle."""
        if self.is_local(model, version):
            return {"placement": "fused"}
        direct = self._watch is not None and self.channel.has_endpoints(model, version)
        return {
            "placement": "replica",
            "channel": "direct" if direct else "handle",
            **self.channel.state(model, version),
        }

    def _direct(self, model: str, version: str) -> bool:
        """Whether a version's predictions go over the direct channel now."""
        if self._watch is None:
            return False
        if self.channel.has_endpoints(model, version):
            return True
        self._watch.start(model, version, self.channel.update)
        return False

    async def _call_handle(
        self, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        try:
            response = getattr(self._handle(model, version), method).remote(*args)
        except Exception as exc:  # the version's application is not deployed (yet)
            raise NotReady(f"{model}/{version} is not available: {exc}") from None
        try:
            # asyncio.timeout, not wait_for: the call runs in this task, no new one.
            async with asyncio.timeout(timeout_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise _late(model, version, timeout_s) from None
        except BackPressureError:
            raise Overloaded(f"{model}/{version} is overloaded; retry later") from None
        except DeploymentUnavailableError:
            raise NotReady(f"{model}/{version} is not available") from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, ServingError) else None
            if cause is not None:
                raise cause from None
            raise ModelError(f"{model}/{version} failed: {exc.cause!r}") from None

    async def _call_local(
        self, worker: Any, model: str, version: str, method: str, timeout_s: float, *args: Any
    ) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await getattr(worker, method)(*args)
        except TimeoutError:
            raise _late(model, version, timeout_s) from None
        except ServingError:
            raise
        except Exception as exc:
            raise ModelError(f"{model}/{version} failed: {exc!r}") from None

    def _handle(self, model: str, version: str) -> ReplicaHandle:
        key = (model, version)
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = self._factory(model, version)
        return h


def _late(model: str, version: str, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"{model}/{version} did not answer within {timeout_s * 1000:.0f} ms")
