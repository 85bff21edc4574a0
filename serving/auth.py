"""The admin bearer token: from settings, else generated once into a user-only file."""

from __future__ import annotations

import hashlib
import os
import secrets

from serving.settings import Settings


def token_digest(token: str) -> str:
    """What the ingress keeps of the admin token: its SHA-256. Only the digest enters
    Ray's config (and so Ray's logs and any driver's view of it); a presented token is
    hashed and compared with it in constant time."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_token(settings: Settings) -> str | None:
    if settings.admin_token:
        return settings.admin_token
    try:
        return settings.admin_token_file.read_text().strip() or None
    except OSError:
        return None


def ensure_token(settings: Settings) -> str:
    """The configured token, or the one in the token file, created (mode 0600) if absent."""
    token = read_token(settings)
    if token:
        return token
    path = settings.admin_token_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
