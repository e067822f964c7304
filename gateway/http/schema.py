"""The wire schema of every JSON body the gateway writes, and the request's, defined once.

The OpenAPI document's component schemas (`openapi.py`, through `model_json_schema`) derive from these models
and from the request model (`jobs/request.py`, which admission parses bodies with), so the two cannot drift.
The views (`http/views.py`) build every body through them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import AfterValidator, ConfigDict, Field
from pydantic.config import JsonDict

from gateway.errors import ERROR_TABLE
from gateway.jobs.request import (
    MAX_NUM_IMAGES,
    MAX_PRIORITY,
    MIN_PRIORITY,
    GuidanceScale,
    LoraRequest,
    NumImages,
    OutputFormat,
    Positive,
    Seed,
    Steps,
    Strength,
    Timestamp,
    Url,
    WireModel,
)
from gateway.jobs.request import ImageToImageRequest as ImageToImageRequest  # the wire's request, re-exported
from gateway.jobs.request import WireJsonSchema as WireJsonSchema

OutputContentType = Literal["image/png", "image/jpeg", "image/webp"]

ERROR_CODES: tuple[str, ...] = tuple(sorted({code for _, code in ERROR_TABLE.values()}))

JobStatus = Literal["queued", "processing", "completed", "failed", "canceled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
WebhookStatus = Literal["pending", "delivered", "failed", "skipped"]
# The fields of the spec's success example: the document requires only these, so a response that follows the
# spec to the letter validates too; this gateway always sends every JobView field.
SPEC_RESPONSE_FIELDS = (
    "id", "status", "prompt", "negative_prompt", "model", "strength", "steps", "guidance_scale", "seed", "style",
    "created_at", "completed_at", "original_image", "images",
)  # fmt: skip


def _known_error_code(value: str) -> str:
    if value not in ERROR_CODES:
        raise ValueError("unknown error code")
    return value


ErrorCode = Annotated[str, Field(json_schema_extra={"enum": list(ERROR_CODES)}), AfterValidator(_known_error_code)]


# --- responses --------------------------------------------------------------------------------------------


def _spec_requires(*fields: str) -> JsonDict:
    """The document's `required`: the spec's fields only (ours are always sent, see SPEC_RESPONSE_FIELDS)."""
    return {"required": list(fields)}


class Size(WireModel):
    width: Positive
    height: Positive


class ImageRef(WireModel):
    url: Url
    width: Positive
    height: Positive


class OutputImage(ImageRef):
    model_config = ConfigDict(json_schema_extra=_spec_requires("url", "width", "height"))

    seed: Seed = Field(
        description="The seed this image used (seed + i); always sent by this gateway, absent from the spec"
    )
    content_type: OutputContentType = Field(description="The media type `url` serves (the request's output_format).")
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = Field(
        description="Hex SHA-256 of the bytes `url` serves (null only for images stored before this field existed)."
    )


class Progress(WireModel):
    step: Annotated[int, Field(ge=0)]
    total_steps: Annotated[int, Field(ge=0)]
    queue_position: Annotated[int, Field(ge=1)] | None = Field(
        description="While queued: 1 + the queued jobs that start before this one (higher priority first, then "
        "the fair order between keys)."
    )
    estimated_start_at: Timestamp | None = Field(
        default=None,
        description="While queued: when it should start; while processing: when it started. From the times "
        "measured on recently finished jobs; null until some were measured.",
    )
    estimated_finish_at: Timestamp | None = Field(
        default=None,
        description="While queued or processing: when it should finish (a running job: at its pace so far).",
    )


class WebhookAttempt(WireModel):
    """One delivery attempt (`jobs.webhooks.DeliveryAttempt`): `status_code` null when no answer came."""

    at: Timestamp
    status_code: int | None
    error: str | None


class WebhookState(WireModel):
    url: str
    status: WebhookStatus = Field(
        description="pending, then delivered or failed (skipped: a `start`-only filter on a job that never started)"
    )
    attempts: list[WebhookAttempt]


class ErrorObject(WireModel):
    code: ErrorCode
    message: str = Field(min_length=1)
    details: str | None


def error_codes_by_status() -> dict[int, list[str]]:
    """Every wire error code the gateway can send, grouped by HTTP status (from the one error table)."""
    grouped: dict[int, set[str]] = defaultdict(set)
    for status, code in ERROR_TABLE.values():
        grouped[status].add(code)
    return {status: sorted(codes) for status, codes in sorted(grouped.items())}


class ErrorBody(WireModel):
    model_config = ConfigDict(
        json_schema_extra={
            "description": "Every error response. Codes by status: "
            + "; ".join(f"{status}: {', '.join(codes)}" for status, codes in error_codes_by_status().items())
        }
    )

    error: ErrorObject


def _job_view_schema(schema: JsonDict) -> None:
    """Spec-only `required`, and the rules that tie `images`, `completed_at` and `error` to `status`."""
    schema.update(_spec_requires(*SPEC_RESPONSE_FIELDS))
    # `error` is nullable: reuse the generated reference to ErrorObject, whatever the ref template.
    error_branches = cast(list[JsonDict], cast(JsonDict, cast(JsonDict, schema["properties"])["error"])["anyOf"])
    error_ref = next(branch for branch in error_branches if "$ref" in branch)
    schema["allOf"] = [
        {
            "if": {"properties": {"status": {"const": "completed"}}, "required": ["status"]},
            "then": {"properties": {"images": {"minItems": 1}, "completed_at": {"type": "string"}}},
        },
        {
            "if": {"properties": {"status": {"enum": ["queued", "processing"]}}, "required": ["status"]},
            "then": {"properties": {"images": {"maxItems": 0}, "completed_at": {"type": "null"}}},
        },
        {
            "if": {"properties": {"status": {"const": "failed"}}, "required": ["status"]},
            "then": {"properties": {"error": error_ref}, "required": ["error"]},
        },
    ]


class JobView(WireModel):
    """A job, in the spec's response shape. While `queued` or `processing`, `images` is [] and `completed_at` \
is null; a `failed` job carries the error object."""

    model_config = ConfigDict(json_schema_extra=_job_view_schema)

    id: str = Field(min_length=1)
    status: JobStatus
    prompt: str
    negative_prompt: str | None
    model: str
    strength: Strength
    steps: Steps
    guidance_scale: GuidanceScale
    seed: Seed = Field(description="Always set: a random seed is drawn when the job is created.")
    style: str | None
    num_images: NumImages
    webhook_url: str | None
    created_at: Timestamp
    started_at: Timestamp | None = Field(
        default=None, description="When a worker first began it (null while queued, and for a cached answer)."
    )
    completed_at: Timestamp | None
    original_image: ImageRef = Field(description="The input: its URL (or a stored copy) and size.")
    processed_size: Size = Field(description="The size the model works at (= each output's size).")
    effective_steps: Positive = Field(description="Denoising steps diffusers runs.")
    scheduler: str | None = Field(description="The scheduler run (short name); null: the model's default.")
    output_format: OutputFormat
    output_quality: int | None = Field(description="The quality the images were encoded at; null for png.")
    loras: list[LoraRequest] = Field(description="The LoRA adapters applied, with their scales ([]: none).")
    priority: Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)] = Field(
        description="0 bulk, 1 normal, 2 interactive, as requested."
    )
    max_queue_s: float | None = Field(description="The longest it could wait to start, as requested; null: no limit.")
    cached: bool = Field(
        description="Answered from the exact-result cache: the images are copies of an earlier identical job's."
    )
    masked: bool = Field(description="A masked edit: only the mask's area was changed (the request's `mask`).")
    mask_blur: int | None = Field(description="The mask's blur as run (the default filled in); null: unmasked.")
    images: list[OutputImage] = Field(max_length=MAX_NUM_IMAGES)
    progress: Progress | None
    error: ErrorObject | None
    webhook: WebhookState | None


class LoraLimits(WireModel):
    slots: int = Field(description="Adapters each model instance holds at once (more in one batch run in turns).")
    max_rank: int = Field(description="The highest adapter rank it serves.")
    max_per_request: int = Field(description="Adapters one request may name.")


class ModelInfo(WireModel):
    id: str
    object: Literal["model"]
    native_resolution: int
    resolution_multiple: int
    scheduler: str | None
    default_scheduler: str | None = Field(description="The `scheduler` a request without one runs.")
    schedulers: list[str] = Field(description="The `scheduler` names this model takes.")
    dtype: str
    defaults: dict[str, Any]
    family: Literal["sd", "sdxl"] = Field(description="Stable Diffusion 1.x/2.x layout, or SDXL.")
    turbo: bool = Field(description="A distilled model: its `defaults` are few steps without guidance.")
    inpainting: bool = Field(
        description="A dedicated inpainting model: its UNet takes 9 input channels (latents, mask, masked-image "
        "latents)."
    )
    lora: LoraLimits | None = Field(description="Its LoRA slots (null: exported without, `loras` refused).")


class LoraInfo(WireModel):
    id: str = Field(description="The name a request gives in `loras`.")
    object: Literal["lora"]
    family: Literal["sd1", "sd2", "sdxl"] | None = Field(
        description="The base family the file says it is for (metadata, SDXL's layer names, the cross-attention "
        "width); null when it does not tell (its layers' shapes decide)."
    )
    rank: int = Field(description="Its highest rank.")
    format: Literal["diffusers", "kohya"] = Field(description="The key layout it is written in.")
    components: list[Literal["unet", "text_encoder", "text_encoder_2"]] = Field(description="What it adapts.")
    size_bytes: int
    models: list[str] = Field(description="The served models it fits (family, layers, rank).")


class LoraList(WireModel):
    object: Literal["list"]
    data: list[LoraInfo]


class ModelList(WireModel):
    object: Literal["list"]
    default: str
    limits: dict[str, dict[str, Any]] = Field(description="Parameter limits, as enforced (see the request schema).")
    data: list[ModelInfo]


class StyleInfo(WireModel):
    id: str
    prompt_template: str
    negative_prompt: str | None


class StyleList(WireModel):
    object: Literal["list"]
    data: list[StyleInfo]


class Status(WireModel):
    status: Literal["ok", "ready", "not_ready"]


class WebhookSecret(WireModel):
    secret: str = Field(
        min_length=1,
        description="The current `whsec_` secret (Standard Webhooks): `Webhook(secret).verify(body, headers)`.",
    )
    previous_expires_at: Timestamp | None = Field(
        description="Until when the previous secret still signs beside it after a rotation; null when none does."
    )
