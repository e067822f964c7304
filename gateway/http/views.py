"""The job as the wire shows it: a `Job` and its live progress rendered through the one `JobView` schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.http import schema
from gateway.jobs.model import Job
from gateway.jobs.runner import Progress
from gateway.jobs.webhooks import SigningSecrets


def job_view(job: Job, progress: Progress | None) -> dict[str, Any]:
    """The public JSON of a job; built through `schema.JobView`, so it cannot drift from the OpenAPI document."""
    spec = job.spec
    view = schema.JobView(
        id=job.id,
        status=str(job.status),  # type: ignore[arg-type]  # a JobStatus value; the model checks it
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        model=spec.model,
        strength=spec.strength,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        style=spec.style,
        num_images=spec.num_images,
        webhook_url=spec.webhook_url,
        created_at=job.created_at,
        completed_at=job.completed_at,
        original_image=schema.ImageRef(url=job.input.url, width=job.input.width, height=job.input.height),
        processed_size=schema.Size(width=spec.processed_size.width, height=spec.processed_size.height),
        effective_steps=spec.effective_steps,
        scheduler=spec.scheduler,
        output_format=spec.output_format,  # type: ignore[arg-type]  # an OutputFormat value; the model checks it
        output_quality=spec.output_quality,
        images=[
            schema.OutputImage(
                url=i.url,
                width=i.width,
                height=i.height,
                seed=i.seed,
                content_type=i.content_type,  # type: ignore[arg-type]  # a storage content type; checked
                sha256=i.sha256,
            )
            for i in job.images
        ],
        progress=None
        if progress is None
        else schema.Progress(
            step=progress.step, total_steps=progress.total_steps, queue_position=progress.queue_position
        ),
        error=None
        if job.error is None
        else schema.ErrorObject(code=job.error.code, message=job.error.message, details=job.error.details),
        webhook=None
        if job.webhook is None
        else schema.WebhookState(
            url=job.webhook.url,
            status=str(job.webhook.status),  # type: ignore[arg-type]
            attempts=[  # those of the event `status` is about (`start` while it runs, then `completed`)
                schema.WebhookAttempt(at=a.at, status_code=a.status_code, error=a.error)
                for a in job.webhook.attempts
                if a.event == job.webhook.event
            ],
        ),
    )
    return view.model_dump(mode="json")


def secret_view(secrets: SigningSecrets, now: float) -> dict[str, Any]:
    """`GET /v1/webhook-secret`'s body: the current secret, and until when the previous one still signs."""
    overlap = secrets.previous is not None and now < secrets.previous_until
    until = (
        datetime.fromtimestamp(secrets.previous_until, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return schema.WebhookSecret(secret=secrets.current, previous_expires_at=until if overlap else None).model_dump(
        mode="json"
    )
