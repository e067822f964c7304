"""Standard Webhooks (https://www.standardwebhooks.com): signing, per-key secrets and their rotation, backoff.

Every delivery carries `webhook-id` (one per job and event, the same on retries and redeliveries),
`webhook-timestamp` (epoch seconds, new on each attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">` under each secret that signs now, space-separated. Receivers verify with the
`standardwebhooks` library in any language (`Webhook(secret).verify(body, headers)`); the gateway signs with the
same library, so the two cannot disagree.

Secrets (`whsec_` + base64 of 32 bytes) are per owner (an API key's hash, or `anonymous`), kept in the job
store and created on first need: random, or, with `IMAGEN_WEBHOOK_SECRET` set, derived from it (so a deployment
can recompute a key's first secret). A rotation makes a new random secret current and keeps the previous one
signing beside it for `IMAGEN_WEBHOOK_SECRET_OVERLAP_S`, so a receiver can switch without losing a delivery.
Secrets are never logged (`repr` hides them).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from standardwebhooks.webhooks import Webhook

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
SECRET_BYTES = 32
MAX_BACKOFF_S = 300.0
_SEED_DOMAIN = b"imagen-webhook-secret-v2\0"  # the derivation of first secrets from IMAGEN_WEBHOOK_SECRET

# Sends one POST; returns the HTTP status, or raises OSError/our ApiError for transport failures.
Poster = Callable[[str, bytes, Mapping[str, str]], Awaitable[int]]


def _encode(key: bytes) -> str:
    return SECRET_PREFIX + base64.b64encode(key).decode()


def random_secret() -> str:
    return _encode(secrets.token_bytes(SECRET_BYTES))


def derived_secret(seed: str, owner: str) -> str:
    """An owner's first secret under a configured seed: the same on every replica and across restarts."""
    return _encode(hmac.new(seed.encode(), _SEED_DOMAIN + owner.encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class SigningSecrets:
    """An owner's webhook secrets: `current`, and `previous` still signing until `previous_until` (epoch s).
    `version` is the compare-and-set token of rotations (1 when created)."""

    owner: str
    current: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)
    previous_until: float = 0.0
    version: int = 1

    def signing(self, now: float) -> tuple[str, ...]:
        """The secrets that sign a delivery made at `now`: the current one, and the previous during its overlap."""
        if self.previous is not None and now < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)

    def rotated(self, new: str, now: float, overlap_s: float) -> SigningSecrets:
        return dataclasses.replace(
            self, current=new, previous=self.current, previous_until=now + overlap_s, version=self.version + 1
        )


class SecretStore(Protocol):
    """What the keeper needs of the job store (`JobStore` has it)."""

    async def webhook_secrets(self, owner: str) -> SigningSecrets | None: ...

    async def put_webhook_secrets(self, proposed: SigningSecrets) -> SigningSecrets:
        """Compare-and-set: store `proposed` if the owner has none (version 1) or the stored version is
        `proposed.version - 1`; return what is stored then (the winner's secrets when the race was lost)."""
        ...


class SecretKeeper:
    """Per-owner secrets: read (created on first need), rotated with compare-and-set.

    Two concurrent rotations of one owner make one rotation: the loser's compare-and-set fails and it answers
    the winner's new secret, so both callers learn the same one and the old secret's overlap starts once.
    """

    def __init__(
        self,
        store: SecretStore,
        *,
        seed: str | None,
        overlap_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.seed = seed
        self.overlap_s = overlap_s
        self.clock = clock

    async def current(self, owner: str) -> SigningSecrets:
        found = await self.store.webhook_secrets(owner)
        if found is not None:
            return found
        first = derived_secret(self.seed, owner) if self.seed else random_secret()
        return await self.store.put_webhook_secrets(SigningSecrets(owner, first))

    async def rotate(self, owner: str) -> SigningSecrets:
        """A new random secret; the previous one signs beside it for `overlap_s`."""
        stored = await self.current(owner)
        return await self.store.put_webhook_secrets(stored.rotated(random_secret(), self.clock(), self.overlap_s))

    async def signing(self, owner: str) -> tuple[str, ...]:
        return (await self.current(owner)).signing(self.clock())


def event_id(job_id: str, event: str) -> str:
    """The `webhook-id` of one event of one job: stable across retries, redeliveries and re-runs."""
    return f"{job_id}_{event}"


def signed_headers(signing: Sequence[str], msg_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one `v1,` signature per secret in `signing`."""
    timestamp = datetime.fromtimestamp(int(time.time() if now is None else now), UTC)
    text = body.decode()  # our bodies are JSON (ASCII); the library signs text
    return {
        "Content-Type": "application/json",
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(int(timestamp.timestamp())),
        SIGNATURE_HEADER: " ".join(Webhook(secret).sign(msg_id, timestamp, text) for secret in signing),
        "User-Agent": "imagen-webhooks/2",
    }


def backoff_s(attempt: int, base_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry `attempt` (1-based): base * 2^(attempt-1), with +-50% jitter, capped."""
    jitter = rng.uniform(0.5, 1.5) if rng is not None else random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not a secret)
    return min(MAX_BACKOFF_S, base_s * 2.0 ** (attempt - 1)) * jitter
