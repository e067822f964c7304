"""Issue 13, Standard Webhooks, on the runner with the in-memory store (the integration tests do it for real):
`start` and `completed` events, the `webhook_events` filter, redelivery, and signing across a secret rotation."""

from __future__ import annotations

import asyncio

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import InvalidRequest, NotFound, NothingToRedeliver
from gateway.jobs import webhooks
from gateway.jobs.model import COMPLETED, WebhookEvent, WebhookStatus
from gateway.jobs.request import parse_image_to_image
from tests.unit.fakes import FakeExecutor, InMemoryJobStore, make_job
from tests.unit.test_job_runner import SECRET, MakeRig, eventually, fast_retries, make_rig

__all__ = ["fast_retries", "make_rig"]  # the fixtures, shared with test_job_runner.py

START, DONE = WebhookEvent.START, WebhookEvent.COMPLETED
BASE = {"image": "https://example.com/in.png", "prompt": "a cat", "webhook_url": "https://hooks.example/x"}


@pytest.mark.parametrize(
    ("sent", "parsed"),
    [(None, ("completed",)), (["start"], ("start",)), (["completed", "start"], ("completed", "start"))],
)
def test_webhook_events_default_to_completed(sent: list[str] | None, parsed: tuple[str, ...]) -> None:
    body = BASE if sent is None else {**BASE, "webhook_events": sent}
    assert parse_image_to_image(body, styles=STYLE_PRESETS).webhook_events == parsed


@pytest.mark.parametrize("sent", [[], ["start", "start"], ["output"], "start", [1], None, {"start": True}])
def test_webhook_events_refused_with_the_rule(sent: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_image_to_image({**BASE, "webhook_events": sent}, styles=STYLE_PRESETS)
    assert info.value.message == "Invalid field 'webhook_events'"
    assert info.value.details == (
        "'webhook_events' must be a list of distinct events, at least one, of: start, completed"
    )


async def test_start_and_completed_events_in_order_each_signed(make_rig: MakeRig) -> None:
    gate = asyncio.Event()
    rig = make_rig(executor=FakeExecutor(gate=gate))
    await rig.manager.start()
    job = await rig.submit(make_job("a", webhook="http://hook.test/a", events=(START, DONE)))
    await eventually(lambda: len(rig.poster.calls) == 1)  # `start` arrives while the job runs
    assert rig.poster.calls[0].payload["status"] == "processing"
    gate.set()
    final = await rig.settled("a")
    assert final.status == COMPLETED and final.webhook is not None
    assert final.webhook.status == WebhookStatus.DELIVERED and final.webhook.event == DONE
    start, completed = rig.poster.calls
    assert completed.payload["status"] == "completed"
    assert [c.headers[webhooks.ID_HEADER] for c in (start, completed)] == ["a_start", "a_completed"]
    secret = webhooks.derived_secret(SECRET, job.owner)
    for call in (start, completed):
        Webhook(secret).verify(call.body, dict(call.headers))
    assert [a.event for a in final.webhook.attempts] == [START, DONE]


async def test_start_only_filter_sends_no_final_event_and_skips_a_job_that_never_started(make_rig: MakeRig) -> None:
    rig = make_rig()
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a", events=(START,)))
    final = await rig.settled("a")
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    await asyncio.sleep(0.05)
    assert [c.headers[webhooks.ID_HEADER] for c in rig.poster.calls] == ["a_start"]
    canceled = make_job("b", webhook="http://hook.test/b", events=(START,)).cancel_requested_now()
    assert canceled is not None and canceled.webhook is not None
    assert canceled.webhook.status == WebhookStatus.SKIPPED  # canceled while queued: nothing to say


async def test_redeliver_sends_the_final_event_again_with_the_same_id(make_rig: MakeRig) -> None:
    rig = make_rig()
    await rig.manager.start()
    job = await rig.submit(make_job("a", webhook="http://hook.test/a"))
    await rig.settled("a")
    again = await rig.manager.redeliver("a", job.owner)
    assert again.webhook is not None and again.webhook.status == WebhookStatus.PENDING
    await eventually(lambda: len(rig.poster.calls) == 2)
    final = await rig.settled("a")
    first, second = rig.poster.calls
    assert first.headers[webhooks.ID_HEADER] == second.headers[webhooks.ID_HEADER] == "a_completed"
    assert first.body == second.body
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    assert len(final.webhook.attempts) == 2 and final.webhook.tries == 1
    with pytest.raises(NotFound):
        await rig.manager.redeliver("a", "another-owner")
    await rig.submit(make_job("plain"))
    await rig.final("plain")
    with pytest.raises(NothingToRedeliver, match="Nothing to redeliver"):
        await rig.manager.redeliver("plain", job.owner)
    await rig.submit(make_job("start-only", webhook="http://hook.test/s", events=(START,)))
    await rig.settled("start-only")
    with pytest.raises(NothingToRedeliver):
        await rig.manager.redeliver("start-only", job.owner)


async def test_redeliver_of_an_unfinished_job_is_refused(make_rig: MakeRig) -> None:
    gate = asyncio.Event()
    rig = make_rig(executor=FakeExecutor(gate=gate))
    await rig.manager.start()
    job = await rig.submit(make_job("a", webhook="http://hook.test/a"))
    with pytest.raises(NothingToRedeliver, match="not finished"):
        await rig.manager.redeliver("a", job.owner)
    gate.set()
    await rig.settled("a")


async def test_after_a_rotation_both_secrets_sign_until_the_overlap_ends(make_rig: MakeRig) -> None:
    rig = make_rig(store=InMemoryJobStore(), webhook_secret_overlap_s=0.3)
    await rig.manager.start()
    owner = make_job("x").owner
    old = (await rig.manager.secrets.current(owner)).current
    new = (await rig.manager.secrets.rotate(owner)).current
    await rig.submit(make_job("during", webhook="http://hook.test/a"))
    await rig.settled("during")
    during = rig.poster.calls[-1]
    Webhook(new).verify(during.body, dict(during.headers))
    Webhook(old).verify(during.body, dict(during.headers))
    await asyncio.sleep(0.35)
    await rig.submit(make_job("after", webhook="http://hook.test/a"))
    await rig.settled("after")
    after = rig.poster.calls[-1]
    Webhook(new).verify(after.body, dict(after.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, dict(after.headers))


def test_no_redelivery_while_a_round_of_the_final_event_is_pending() -> None:
    """Issue 22, point 2: each redeliver call restarted the round, so 200 calls made 70 POSTs in 4 s."""
    import dataclasses

    from gateway.jobs.model import FAILED, DeliveryAttempt

    ended = make_job("a", webhook="http://receiver.test/hook").ended(FAILED)
    assert ended is not None and ended.webhook is not None and ended.webhook.status == WebhookStatus.PENDING
    assert ended.redelivery_requested() is None  # its first round is still being delivered
    delivered = ended.with_delivery(DeliveryAttempt("t", 204, None), max_attempts=3)
    assert delivered is not None
    again = delivered.redelivery_requested()
    assert again is not None and again.webhook is not None and again.webhook.status == WebhookStatus.PENDING
    assert again.redelivery_requested() is None
    failed = dataclasses.replace(again, webhook=dataclasses.replace(again.webhook, status=WebhookStatus.FAILED))
    assert failed.redelivery_requested() is not None  # a round that gave up may be asked for again
