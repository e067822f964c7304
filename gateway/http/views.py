"""The job as the wire shows it: a `Job` and its live progress rendered through the one `JobView` schema."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from gateway.diffusion.lora_format import Adapter
from gateway.http import schema
from gateway.jobs.model import Job, JobSpec
from gateway.jobs.runner import Progress
from gateway.jobs.webhooks import SigningSecrets


def _wire(value: Any) -> Any:
    if isinstance(value, tuple):  # a spec's tuple of dataclasses (its LoRA choices): a JSON array of objects
        return [_wire(item) for item in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


# The view's fields that echo the job's spec, by name: a field declared on both shows with no change here.
_ECHOED = tuple(name for name in schema.JobView.model_fields if name in {f.name for f in dataclasses.fields(JobSpec)})


def job_view(job: Job, progress: Progress | None) -> dict[str, Any]:
    """The public JSON of a job; built through `schema.JobView`, so it cannot drift from the OpenAPI document."""
    hook = job.webhook
    view = schema.JobView.model_validate(
        {
            **{name: _wire(getattr(job.spec, name)) for name in _ECHOED},
            "id": job.id,
            "status": str(job.status),
            "created_at": job.created_at,
            "started_at": _timestamp(job.started_at),
            "completed_at": job.completed_at,
            "original_image": {"url": job.input.url, "width": job.input.width, "height": job.input.height},
            "images": [
                {
                    "url": i.url,
                    "width": i.width,
                    "height": i.height,
                    "seed": i.seed,
                    "content_type": i.content_type,
                    "sha256": i.sha256,
                }
                for i in job.images
            ],
            "progress": None if progress is None else _progress(progress),
            "cached": job.cached_from is not None,
            "error": _wire(job.error),
            "webhook": None
            if hook is None
            else {
                "url": hook.url,
                "status": str(hook.status),
                "attempts": [  # those of the event `status` is about (`start` while it runs, then `completed`)
                    {"at": a.at, "status_code": a.status_code, "error": a.error}
                    for a in hook.attempts
                    if a.event == hook.event
                ],
            },
        }
    )
    return view.model_dump(mode="json")


def _timestamp(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _progress(progress: Progress) -> dict[str, Any]:
    return {
        **_wire(progress),
        "estimated_start_at": _timestamp(progress.estimated_start_at),
        "estimated_finish_at": _timestamp(progress.estimated_finish_at),
    }


def lora_view(adapter: Adapter, models: list[str]) -> dict[str, Any]:
    """One adapter of `GET /v1/loras`: what it is for and which served models it fits."""
    return schema.LoraInfo(
        id=adapter.name,
        object="lora",
        family=adapter.family,  # type: ignore[arg-type]  # lora_format's families are LoraInfo's
        rank=adapter.rank,
        format=adapter.layout,  # type: ignore[arg-type]
        components=list(adapter.components),  # type: ignore[arg-type]
        size_bytes=adapter.size_bytes,
        models=models,
    ).model_dump(mode="json")


def secret_view(secrets: SigningSecrets, now: float) -> dict[str, Any]:
    """`GET /v1/webhook-secret`'s body: the current secret, and until when the previous one still signs."""
    overlap = secrets.previous is not None and now < secrets.previous_until
    until = _timestamp(secrets.previous_until)
    return schema.WebhookSecret(secret=secrets.current, previous_expires_at=until if overlap else None).model_dump(
        mode="json"
    )
