"""Bearer API keys: load them once at startup, check each request in constant time."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

from gateway.errors import Unauthorized

BEARER_SCHEME = "bearer"
# RFC 6750 b64token: the only characters a bearer token can carry in an Authorization header.
API_KEY_PATTERN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
COMMENT_PREFIX = "#"
AUTH_DETAILS = "Send 'Authorization: Bearer <API key>'"


def _bearer_token(authorization_header: str | None) -> str | None:
    """The token of a well-formed `Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER_SCHEME or not token:
        return None
    return token


def _match_key(token: str, keys: frozenset[str]) -> str | None:
    """Compare against every key without stopping early, so timing does not reveal which one matched."""
    candidate = token.encode()
    matched: str | None = None
    for key in keys:
        if hmac.compare_digest(candidate, key.encode()):
            matched = key
    return matched


def check_bearer(authorization_header: str | None, keys: frozenset[str], allow_anonymous: bool) -> str | None:
    """Return the caller's API key, or None for an anonymous caller when `allow_anonymous` is set.

    With `allow_anonymous`, a missing, malformed or unknown token is let through as anonymous (None) rather
    than rejected, so clients that always send a token keep working; a valid key is still returned so usage
    can be attributed. Without it: no usable token -> "Missing bearer token", unknown -> "Invalid API key".
    """
    token = _bearer_token(authorization_header)
    matched = None if token is None else _match_key(token, keys)
    if matched is not None or allow_anonymous:
        return matched
    if token is None:
        raise Unauthorized("Missing bearer token", AUTH_DETAILS)
    raise Unauthorized("Invalid API key", AUTH_DETAILS)


def load_api_keys(env_value: str | None, keys_file: Path | None) -> frozenset[str]:
    """Union of a comma-separated env value and a file with one key per line.

    In the file, blank lines and lines starting with `#` are ignored. A key that could never be sent as a
    bearer token (spaces, non-ASCII...) raises ValueError at startup, naming where it is but not the key.
    A missing file raises FileNotFoundError: a configured key file that is absent is a deployment error.
    """
    found: list[tuple[str, str]] = []
    if env_value:
        found.extend((key.strip(), f"env entry {i + 1}") for i, key in enumerate(env_value.split(",")))
    if keys_file is not None:
        for number, line in enumerate(keys_file.read_text(encoding="utf-8").splitlines(), start=1):
            stripped = line.strip()
            if not stripped.startswith(COMMENT_PREFIX):
                found.append((stripped, f"{keys_file}:{number}"))
    keys: set[str] = set()
    for key, where in found:
        if not key:
            continue
        if not API_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"API key at {where} is not a valid bearer token (RFC 6750 b64token)")
        keys.add(key)
    return frozenset(keys)
