"""The SQLite job store and the webhook signing helpers, without a server."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from gateway import webhooks
from gateway.jobs import (
    COMPLETED,
    PROCESSING,
    QUEUED,
    IdempotencyConflict,
    Job,
    SqliteJobStore,
    WebhookState,
    now_iso,
    owner_of,
    request_hash,
)


def make_job(job_id: str, *, owner: str = "o", key: str | None = None, body: str = "a", **kw: object) -> Job:
    now = now_iso()
    return Job(
        id=job_id,
        owner=owner,
        status=QUEUED,
        params={"num_images": 1, "effective_steps": 3},
        input={"url": "u", "name": f"{job_id}_input.png", "width": 1, "height": 1},
        created_at=now,
        updated_at=now,
        idempotency_key=key,
        request_hash=request_hash({"b": body}),
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_and_queries(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
        a = await store.create(make_job("a", webhook=WebhookState("http://h/x")))
        await store.create(make_job("b"))
        a.status, a.completed_at, a.result = COMPLETED, now_iso(), {"images": [{"url": "x"}]}
        await store.save(a)
        got = await store.get("a")
        assert (
            got is not None and got.result == {"images": [{"url": "x"}]} and got.webhook == WebhookState("http://h/x")
        )
        assert [j.id for j in await store.unfinished()] == ["b"]
        assert [j.id for j in await store.undelivered()] == ["a"]  # completed, webhook still pending
        assert await store.expired(now_iso()) == []  # a pending webhook keeps a job alive
        a.webhook = WebhookState("http://h/x", status="delivered")
        await store.save(a)
        await asyncio.sleep(0.002)
        assert [j.id for j in await store.expired(now_iso())] == ["a"]
        await store.delete("a")
        assert await store.get("a") is None
        await store.close()

    asyncio.run(scenario())


def test_survives_reopen(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
        job = await store.create(make_job("x"))
        job.status = PROCESSING
        await store.save(job)
        await store.close()
        reopened = SqliteJobStore(tmp_path / "jobs.sqlite3")
        assert [(j.id, j.status) for j in await reopened.unfinished()] == [("x", PROCESSING)]
        await reopened.close()

    asyncio.run(scenario())


def test_idempotency_per_owner(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
        first = await store.create(make_job("1", key="k", body="same"))
        again = await store.create(make_job("2", key="k", body="same"))
        assert again.id == first.id  # the retry gets the original job
        with pytest.raises(IdempotencyConflict):
            await store.create(make_job("3", key="k", body="other"))
        other_owner = await store.create(make_job("4", owner="p", key="k", body="other"))
        assert other_owner.id == "4"  # keys are scoped to their owner
        assert (await store.get_idempotent("o", "k")) is not None and await store.get("3") is None
        await store.close()

    asyncio.run(scenario())


def test_owner_is_a_hash_of_the_key() -> None:
    assert owner_of(None) == "anonymous"
    assert owner_of("secret-key") != "secret-key" and len(owner_of("secret-key")) == 64


def test_signature_round_trip_and_tampering() -> None:
    secret = webhooks.key_secret("server-secret", owner_of("k"))
    assert secret.startswith("whsec_") and secret != webhooks.key_secret("server-secret", owner_of("k2"))
    body = b'{"id":"img_transform_1","status":"completed"}'
    headers = webhooks.signed_headers(secret, "img_transform_1", body)
    assert webhooks.verify(secret, headers, body)
    assert not webhooks.verify(secret, headers, body[:-1])
    assert not webhooks.verify(webhooks.key_secret("other", owner_of("k")), headers, body)
    stale = {**headers, webhooks.TIMESTAMP_HEADER: str(int(time.time()) - 3600)}
    stale[webhooks.SIGNATURE_HEADER] = webhooks.sign(secret, int(stale[webhooks.TIMESTAMP_HEADER]), body)
    assert not webhooks.verify(secret, stale, body), "old timestamps are replays"


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(0)
    delays = [webhooks.backoff_s(n, 1.0, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        assert 0.5 * 2 ** (n - 1) <= delay <= 1.5 * 2 ** (n - 1)
    assert webhooks.backoff_s(30, 1.0, rng) <= webhooks.MAX_BACKOFF_S * 1.5


def test_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    first = webhooks.load_or_create_secret(None, path)
    assert webhooks.load_or_create_secret(None, path) == first and len(first) == 64
    assert webhooks.load_or_create_secret("configured", path) == "configured"
    assert path.stat().st_mode & 0o077 == 0
