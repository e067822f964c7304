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


def known_key(authorization_header: str | None, keys: frozenset[str]) -> str | None:
    """The configured key this header presents, else None (never raises: for keying limits, not for access)."""
    token = _bearer_token(authorization_header)
    return None if token is None else _match_key(token, keys)


def check_bearer(authorization_header: str | None, keys: frozenset[str], allow_anonymous: bool) -> str | None:
    """Return the caller's API key, or None for an anonymous caller when `allow_anonymous` is set.

    A presented key that is not one of `keys` is always refused ("Invalid API key"): with keys configured, a
    mistyped key must not become the shared anonymous user, who would see other anonymous callers' jobs. With
    `allow_anonymous`, a request without an Authorization header is anonymous, and so is any token when no key is
    configured at all (there is no key to mistype; SDKs always send one). Without it: no header or no usable
    token -> "Missing bearer token".
    """
    token = _bearer_token(authorization_header)
    matched = None if token is None else _match_key(token, keys)
    if matched is not None:
        return matched
    presented = bool(authorization_header and authorization_header.strip())
    if allow_anonymous and (not presented or not keys):
        return None
    if token is None:  # no header, or one that is not `Bearer <token>`
        raise Unauthorized("Missing bearer token", AUTH_DETAILS)
    raise Unauthorized("Invalid API key", AUTH_DETAILS)
