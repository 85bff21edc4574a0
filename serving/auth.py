"""Bearer tokens, each from settings, else generated once into a user-only file:
`admin` (rollouts, batching, monitoring) and `feedback` (a trusted label source may post
labels for any prediction; anyone else needs the answer's own feedback key)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Literal

from serving.settings import Settings

Kind = Literal["admin", "feedback"]


def token_digest(token: str) -> str:
    """What the ingress keeps of the admin token: its SHA-256. Only the digest enters
    Ray's config (and so Ray's logs and any driver's view of it); a presented token is
    hashed and compared with it in constant time."""
    return hashlib.sha256(token.encode()).hexdigest()


def _where(settings: Settings, kind: Kind) -> tuple[str | None, Path]:
    if kind == "admin":
        return settings.admin_token, settings.admin_token_file
    return settings.feedback_token, settings.feedback_token_file


def read_token(settings: Settings, kind: Kind = "admin") -> str | None:
    token, path = _where(settings, kind)
    if token:
        return token
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ensure_token(settings: Settings, kind: Kind = "admin") -> str:
    """The configured token, or the one in the token file, created (mode 0600) if absent."""
    token = read_token(settings, kind)
    if token:
        return token
    path = _where(settings, kind)[1]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def bearer_ok(authorization: str, digest: str | None) -> bool:
    """Whether an `Authorization` header carries the token whose digest is `digest`
    (compared in constant time). No digest configured: nothing matches."""
    scheme, _, token = authorization.partition(" ")
    return (
        digest is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(token_digest(token).encode(), digest.encode())
    )
