"""`serving health` (the images' HEALTHCHECK): 0 only when /readyz answers 200, on the
port the gateway serves on, platform modes included."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port


class Readiness(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Readiness)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    Readiness.status = 200


def health(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "AIP_"))}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "health", *args],
        capture_output=True, text=True, timeout=30, env={**clean, **env},
    )  # fmt: skip


def test_ready_is_healthy_on_the_configured_port(server: ThreadingHTTPServer) -> None:
    port = str(server.server_address[1])
    # A wildcard bind address (the images' 0.0.0.0) is reached on loopback.
    out = health(SERVING_HTTP_PORT=port, SERVING_HTTP_HOST="0.0.0.0")
    assert out.returncode == 0, out.stderr
    assert f"http://127.0.0.1:{port}/readyz" in out.stdout
    # Vertex AI's port variable moves the gateway, and the check with it.
    assert health(AIP_HTTP_PORT=port).returncode == 0


def test_not_ready_or_not_there_is_unhealthy(server: ThreadingHTTPServer) -> None:
    port = str(server.server_address[1])
    Readiness.status = 503
    out = health(SERVING_HTTP_PORT=port)
    assert out.returncode == 1 and "answered 503" in out.stderr
    out = health("--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    assert out.returncode == 1 and "ConnectError" in out.stderr
