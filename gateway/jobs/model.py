"""The job: the durable record of every accepted request, and the transitions between its states.

Every accepted request, synchronous or not, is a job written to the store before any work starts, with its
seed resolved and its input image stored: a gateway killed mid-job re-runs it after a restart and gets the
same pixels. A `Job` is immutable; each state change is a pure function here (`claimed`, `finished`, ...)
that the runner applies with a compare-and-set in the store (`JobStore.update`), so two actors racing on one
job (cancel vs completion, cancel vs pickup, retry vs cancel) have exactly one winner.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import TypeAdapter

from gateway.diffusion.img2img import Sampling
from gateway.diffusion.sampling import do_classifier_free_guidance
from gateway.errors import QueueTimeout, status_and_code
from gateway.settings import key_owner


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


QUEUED, PROCESSING, COMPLETED, FAILED, CANCELED = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.COMPLETED,
    JobStatus.FAILED,
    JobStatus.CANCELED,
)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})
UNFINISHED = (QUEUED, PROCESSING)


class WebhookStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing the filter asked for happened (`start` only, canceled before it started)


class WebhookEvent(StrEnum):
    """What a webhook announces (Replicate's names): `start` when a worker begins the job, `completed` when it
    reaches any final state (completed, failed or canceled)."""

    START = "start"
    COMPLETED = "completed"


DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.COMPLETED,)
MAX_DELIVERY_ATTEMPTS_KEPT = 50  # attempt history per job (redeliveries add rounds; the row stays small)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def owner_of(api_key: str | None) -> str:
    """Jobs are owned by a key's hash (never the key itself); anonymous callers share one owner."""
    return "anonymous" if api_key is None else key_owner(api_key)


@dataclass(frozen=True)
class Size:
    width: int
    height: int


@dataclass(frozen=True)
class JobSpec(Sampling):
    """What to run: the admitted request without its image, with the seed resolved and the size fixed. The
    recipe's knobs (`Sampling`) are its own fields, so the stored JSON stays one flat object."""

    prompt: str
    negative_prompt: str | None
    model: str
    seed: int
    style: str | None
    num_images: int
    webhook_url: str | None
    asynchronous: bool
    processed_size: Size
    effective_steps: int
    # Added with issue 12; rows written before it read back with these defaults (what those jobs ran).
    scheduler: str | None = None  # the short name (`schedulers.SCHEDULER_NAMES`); None: the model's own
    output_format: str = "png"
    output_quality: int | None = None  # as encoded (the format's default filled in); None for PNG
    # Added with issue 24: 0 bulk, 1 normal, 2 interactive (the queue's order and every Triton call's priority),
    # and the longest the job may wait to start (None: no limit).
    priority: int = 1
    max_queue_s: float | None = None
    # Added with issue 25: a masked edit (its mask stored beside the input, `Job.mask`) and the mask's blur as
    # run (the default filled in; None when unmasked).
    masked: bool = False
    mask_blur: int | None = None

    @property
    def work(self) -> int:
        """UNet samples this job runs: images x effective steps, twice with classifier-free guidance (the cost
        the key's budget is charged and the fair share between keys counts)."""
        return self.num_images * self.effective_steps * (2 if do_classifier_free_guidance(self.guidance_scale) else 1)


@dataclass(frozen=True)
class InputImage:
    url: str  # the caller's URL, or ours for an uploaded image
    name: str  # the stored copy, read back when the job is (re-)run
    width: int
    height: int


@dataclass(frozen=True)
class OutputImage:
    name: str  # the stored object
    url: str
    width: int
    height: int
    seed: int
    content_type: str = "image/png"  # rows written before issue 12 hold PNGs
    sha256: str | None = None  # hex digest of the stored bytes; None in rows written before issue 12


@dataclass(frozen=True)
class JobError:
    """The spec's error object, as the job ended with it; `code` is one of `errors.ERROR_TABLE`'s."""

    code: str
    message: str
    details: str | None = None


@dataclass(frozen=True)
class DeliveryAttempt:
    at: str
    status_code: int | None
    error: str | None
    event: WebhookEvent = WebhookEvent.COMPLETED

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def new_claim_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Lease:
    """Which worker runs a job, until when (epoch seconds, the store's clock); renewed while it runs.

    `claim` names one claim (one run): minted at each claim, required by renew, release and finish, so a stale run
    of the same worker (frozen, its job taken over and claimed again by the same process) is refused. Rows
    written before issue 22 read back with `claim` "": such a lease is held by nobody (never renewed or
    finished) and is taken over once it expires."""

    owner: str
    expires_at: float
    claim: str = ""

    def held_by(self, worker: str, claim: str) -> bool:
        return bool(self.claim) and self.claim == claim and self.owner == worker


@dataclass(frozen=True)
class WebhookState:
    """The job's outbox entry: delivered by one replica at a time (its `lease`), next try at `next_attempt_at`."""

    url: str
    status: WebhookStatus = WebhookStatus.PENDING
    attempts: tuple[DeliveryAttempt, ...] = ()
    next_attempt_at: float = 0.0  # epoch seconds; 0: as soon as the job is final
    lease: Lease | None = None
    events: tuple[WebhookEvent, ...] = DEFAULT_WEBHOOK_EVENTS  # the request's `webhook_events` filter
    event: WebhookEvent = WebhookEvent.COMPLETED  # the event this entry delivers (`start` once a worker began)
    tries: int = 0  # attempts of `event` in this round (a redelivery starts a new round)

    def delivering(self, event: WebhookEvent) -> WebhookState:
        """A new round for `event`, due now; a delivery in flight keeps its lease, so events never overtake."""
        return dataclasses.replace(self, event=event, status=WebhookStatus.PENDING, tries=0, next_attempt_at=0.0)

    def started(self) -> WebhookState:
        """A worker claimed the job: `start` is due, if asked for and not delivered by an earlier run."""
        sent = any(a.ok and a.event == WebhookEvent.START for a in self.attempts)
        return self.delivering(WebhookEvent.START) if WebhookEvent.START in self.events and not sent else self

    def ended(self) -> WebhookState:
        """The job reached a final state: `completed` is due; with a `start`-only filter a start still being
        delivered goes on, and one that never began (canceled while queued) is skipped."""
        if WebhookEvent.COMPLETED in self.events:
            return self.delivering(WebhookEvent.COMPLETED)
        if self.event == WebhookEvent.COMPLETED and self.status == WebhookStatus.PENDING:
            return dataclasses.replace(self, status=WebhookStatus.SKIPPED)
        return self


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    status: JobStatus
    spec: JobSpec
    input: InputImage
    created_at: str
    updated_at: str
    completed_at: str | None = None
    images: tuple[OutputImage, ...] = ()
    error: JobError | None = None
    webhook: WebhookState | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    request_id: str | None = None  # of the request that created it, for logs
    run_attempts: int = 0  # how many times a worker claimed it (crash re-runs count)
    cancel_requested: bool = False
    steps_done: int = 0  # as of the last store write (live progress is in memory, never written per step)
    lease: Lease | None = None
    not_before: float = 0.0  # epoch seconds before which no worker claims it (a retry's delay)
    finished_claim: str | None = None  # the claim whose run wrote the final state (None: ended by anyone else)
    # Issue 24. The job's virtual start time in its priority's fair queue (the store assigns it at creation);
    # the epoch second after which a job that never started fails `queue_timeout` (None: no limit); when a worker
    # first began it (epoch seconds, the claiming replica's clock: wait estimates); the exact-result cache key
    # (None: not cacheable, no explicit seed or opted out) and, for a job answered from that cache, the job whose
    # result it copied.
    fair_tag: float = 0.0
    queue_deadline: float | None = None
    started_at: float | None = None
    result_key: str | None = None
    cached_from: str | None = None
    # Issue 25. A masked edit's mask as sent (stored beside the input, read back by every run); None: unmasked.
    mask: InputImage | None = None
    version: int = 0  # bumped by every store write: the compare-and-set token

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def stored_names(self) -> list[str]:
        """Every stored object this job owns (retention deletes them with it)."""
        masks = [self.mask.name] if self.mask is not None else []
        return [self.input.name, *masks, *(image.name for image in self.images)]

    # --- transitions: each returns the new job, or None when it does not apply to this state ---------------

    def held_by(self, worker: str, claim: str) -> bool:
        """Processing under this very claim of `worker` (not only the worker: a stale run of it is refused)."""
        return self.status == PROCESSING and self.lease is not None and self.lease.held_by(worker, claim)

    def claimed(self, worker: str, lease_until: float) -> Job | None:
        """queued -> processing under `worker`'s lease, with a new claim id (a canceled or finished job is not
        picked up)."""
        if self.status != QUEUED:
            return None
        return dataclasses.replace(
            self,
            status=PROCESSING,
            run_attempts=self.run_attempts + 1,
            lease=Lease(worker, lease_until, new_claim_id()),
            webhook=self.webhook.started() if self.webhook else None,
            queue_deadline=None,  # it started: `max_queue_s` no longer applies (a retry is bounded by job_retries)
            started_at=self.started_at if self.started_at is not None else time.time(),
        )

    def queue_timed_out(self, now: float) -> Job | None:
        """queued -> failed `queue_timeout`: a job that never started by its `queue_deadline`."""
        if self.status != QUEUED or self.queue_deadline is None or self.queue_deadline > now:
            return None
        limit = self.spec.max_queue_s
        within = f"within {limit:g} s" if limit is not None else "by its deadline"
        timeout = QueueTimeout(
            "The job waited longer than max_queue_s to start",
            f"It was not started {within}; retry later, or with a higher priority or limit",
        )
        _, code = status_and_code(timeout)
        return self.finished_as(FAILED, error=JobError(code, timeout.message, timeout.details))

    def renewed(self, worker: str, claim: str, lease_until: float) -> Job | None:
        if not self.held_by(worker, claim):
            return None
        return dataclasses.replace(self, lease=Lease(worker, lease_until, claim))

    def released(self, worker: str, claim: str, not_before: float = 0.0) -> Job | None:
        """processing -> queued (a retry, not before `not_before`), by the claim holding it; a job whose cancel
        was requested meanwhile ends canceled."""
        if not self.held_by(worker, claim):
            return None
        if self.cancel_requested:
            return dataclasses.replace(self.finished_as(CANCELED), finished_claim=claim)
        return dataclasses.replace(self, status=QUEUED, lease=None, not_before=not_before)

    def requeued(self) -> Job | None:
        """An unfinished job whose worker's process died: queued again, its lease dropped (recovery)."""
        if self.finished:
            return None
        return dataclasses.replace(self, status=QUEUED, lease=None)

    def ended(self, status: JobStatus, *, error: JobError | None = None) -> Job | None:
        """An unfinished job ended by someone other than its worker (recovery); a final job stays as it is."""
        if self.finished:
            return None
        return self.finished_as(status, error=error)

    def cancel_requested_now(self) -> Job | None:
        """A queued job is canceled at once; a running one is asked to stop (its worker decides at the next step)."""
        if self.status == QUEUED:
            return self.finished_as(CANCELED)
        if self.status == PROCESSING and not self.cancel_requested:
            return dataclasses.replace(self, cancel_requested=True)
        return None

    def finished_by(
        self,
        worker: str,
        claim: str,
        status: JobStatus,
        *,
        images: tuple[OutputImage, ...] = (),
        error: JobError | None = None,
        steps_done: int | None = None,
    ) -> Job | None:
        """processing -> a final state, only by the claim holding the lease (a lost lease loses the result); the
        job remembers the claim (`finished_claim`), so a retried finish whose first write committed knows it."""
        if not self.held_by(worker, claim):
            return None
        done = self.finished_as(status, images=images, error=error, steps_done=steps_done)
        return dataclasses.replace(done, finished_claim=claim)

    def finished_as(
        self,
        status: JobStatus,
        *,
        images: tuple[OutputImage, ...] = (),
        error: JobError | None = None,
        steps_done: int | None = None,
    ) -> Job:
        if status not in TERMINAL:
            raise ValueError(f"{status} is not a final state")
        return dataclasses.replace(
            self,
            status=status,
            completed_at=now_iso(),
            images=images,
            error=error,
            lease=None,
            steps_done=self.steps_done if steps_done is None else steps_done,
            webhook=self.webhook.ended() if self.webhook else None,
        )

    def delivery_claimed(self, worker: str, lease_until: float, now: float) -> Job | None:
        """Take the webhook outbox entry: due (`start` once processing, `completed` once final), and no live
        delivery lease on it."""
        hook = self.webhook
        if hook is None or hook.status != WebhookStatus.PENDING or hook.next_attempt_at > now:
            return None
        started = hook.event == WebhookEvent.START and (self.status == PROCESSING or self.finished)
        if not (self.finished or started):
            return None
        if hook.lease is not None and hook.lease.expires_at > now:
            return None  # live, even if ours: a delivery in flight is never handed out twice
        return dataclasses.replace(self, webhook=dataclasses.replace(hook, lease=Lease(worker, lease_until)))

    def with_delivery(self, attempt: DeliveryAttempt, max_attempts: int, next_attempt_at: float = 0.0) -> Job | None:
        """Record one webhook attempt (delivered on a 2xx, failed after the last one of its round, else due again
        at `next_attempt_at`) and release the delivery lease. An attempt of an event no longer current (a `start`
        that ended after the job did) is recorded and releases the lease, nothing else."""
        hook = self.webhook
        if hook is None:
            return None
        attempts = (*hook.attempts, attempt)[-MAX_DELIVERY_ATTEMPTS_KEPT:]
        if attempt.event != hook.event:
            return dataclasses.replace(self, webhook=dataclasses.replace(hook, attempts=attempts, lease=None))
        if hook.status != WebhookStatus.PENDING:
            return None
        tries = hook.tries + 1
        if attempt.ok:
            status = WebhookStatus.DELIVERED
        elif tries >= max_attempts:
            status = WebhookStatus.FAILED
        else:
            status = WebhookStatus.PENDING
        return dataclasses.replace(
            self,
            webhook=dataclasses.replace(
                hook, status=status, attempts=attempts, tries=tries, next_attempt_at=next_attempt_at, lease=None
            ),
        )

    def redelivery_requested(self) -> Job | None:
        """The final event again, in a new round due now (same `webhook-id`); only for a final job whose
        webhook asked for `completed`, and not while a round of it is still pending (it would only restart it:
        each call would make the gateway POST to the caller's URL again)."""
        hook = self.webhook
        if not self.finished or hook is None or WebhookEvent.COMPLETED not in hook.events:
            return None
        if hook.event == WebhookEvent.COMPLETED and hook.status == WebhookStatus.PENDING:
            return None
        return dataclasses.replace(self, webhook=hook.delivering(WebhookEvent.COMPLETED))


_JOB_JSON = TypeAdapter(Job)


def job_to_json(job: Job) -> bytes:
    """The stored form (pydantic serialises the dataclasses; `version` lives in its own column)."""
    return _JOB_JSON.dump_json(job, exclude={"version"})


def job_from_json(raw: str | bytes, *, version: int) -> Job:
    job = _JOB_JSON.validate_json(raw)
    return dataclasses.replace(job, version=version)
