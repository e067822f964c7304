"""Signed webhook delivery with bounded, jittered exponential retries.

Signature (verification recipe in the README): the receiver computes
`hex(HMAC-SHA256(secret, f"{timestamp}.{raw body}"))` and compares it with the `v1=` value of the
`Imagen-Signature` header, and rejects timestamps older than a few minutes (replay). Each API key has its own
secret, derived from the server's signing secret, and readable with `GET /v1/webhook-secret`.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

SIGNATURE_HEADER = "Imagen-Signature"
TIMESTAMP_HEADER = "Imagen-Webhook-Timestamp"
ID_HEADER = "Imagen-Webhook-Id"
MAX_BACKOFF_S = 300.0

# Sends one POST; returns the HTTP status, or raises OSError/our ApiError for transport failures.
Poster = Callable[[str, bytes, Mapping[str, str]], Awaitable[int]]


def load_or_create_secret(configured: str | None, path: Path) -> str:
    """The server signing secret: configured, else generated once and kept beside the job store."""
    if configured:
        return configured
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def key_secret(server_secret: str, owner: str) -> str:
    """The per-key signing secret (owner is the key's hash, so the secret never depends on the raw key)."""
    return "whsec_" + hmac.new(server_secret.encode(), owner.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = 300.0) -> bool:
    """What a receiver does (used by the tests as a receiver would)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(lowered.get(SIGNATURE_HEADER.lower(), ""), sign(secret, timestamp, body))


def backoff_s(attempt: int, base_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry `attempt` (1-based): base * 2^(attempt-1), with +-50% jitter, capped."""
    jitter = rng.uniform(0.5, 1.5) if rng is not None else random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not a secret)
    return min(MAX_BACKOFF_S, base_s * 2.0 ** (attempt - 1)) * jitter


def signed_headers(secret: str, job_id: str, body: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        ID_HEADER: job_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        "User-Agent": "imagen-webhooks/1",
    }
