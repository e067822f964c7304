"""Bearer API keys: check each request in constant time (the keys are loaded with the settings)."""

from __future__ import annotations

import hmac

from gateway.errors import Unauthorized

BEARER_SCHEME = "bearer"
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
