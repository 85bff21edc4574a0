"""What a gRPC servicer sees of its server, for servers other than grpcio's own
(serving/transport/grpc_h2.py): the call's context, aborts, and a registry that takes
the generated `add_*Servicer_to_server` calls in place of a grpc.Server."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import grpc

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Iterable[Any] = ()):
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, tuple(trailing)


class Context:
    """The part of grpc.aio.ServicerContext that servicers use."""

    def __init__(self, metadata: tuple[tuple[str, Any], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self.trailing: tuple[tuple[str, Any], ...] = ()
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.peer_gone = False

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Iterable[Any] = ()
    ) -> None:
        raise Abort(code, details, trailing_metadata)

    def is_active(self) -> bool:
        return not self.peer_gone

    def cancelled(self) -> bool:
        return self.peer_gone


class Registry:
    """Stands for the server in `add_*Servicer_to_server`: collects method handlers by
    their full path."""

    def __init__(self) -> None:
        self.methods: dict[bytes, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}".encode()] = handler

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        for generic in handlers:  # grpc._utilities.DictionaryGenericHandler
            for path, handler in getattr(generic, "_method_handlers", {}).items():
                self.methods.setdefault(path.encode(), handler)


def grpc_timeout(value: str) -> float | None:
    """Seconds from a `grpc-timeout` header value (`100m`, `5S`, ...)."""
    try:
        return int(value[:-1]) * _UNITS[value[-1]]
    except (KeyError, ValueError, IndexError):
        return None
