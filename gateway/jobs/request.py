"""The image-to-image request as the wire sends it: the one model both routes parse into, and its rules.

`parse_image_to_image` is the first step of admission (`jobs/admission.py`): types, ranges and the cross-field rules,
each refused with a 400 naming the field. The OpenAPI document's request schema is this model's JSON schema
(`http/openapi.py`), and `PARAMETER_LIMITS` is read back from it, so `GET /v1/models` and docs/api.md quote the
numbers the validator enforces (tests/unit/test_docs.py holds the page to them). Limits and defaults stay
module constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from gateway.diffusion.sampling import MAX_SEED, MIN_SEED, img2img_effective_steps
from gateway.diffusion.schedulers import SCHEDULER_NAMES
from gateway.diffusion.styles import STYLE_PRESETS, StylePreset
from gateway.errors import InvalidRequest
from gateway.media import codecs

# Defaults (the spec's).
DEFAULT_MODEL = "imagen-v2"
DEFAULT_STRENGTH = 0.7
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_NUM_IMAGES = 1

# Limits.
MIN_STRENGTH = 0.1
MAX_STRENGTH = 1.0
MIN_STEPS = 1
MAX_STEPS = 150
MIN_GUIDANCE_SCALE = 0.0
MAX_GUIDANCE_SCALE = 20.0
MIN_NUM_IMAGES = 1
MAX_NUM_IMAGES = 4
MAX_PROMPT_CHARS = 2000
MAX_NEGATIVE_PROMPT_CHARS = 2000
MAX_MODEL_CHARS = 128
MAX_WEBHOOK_URL_CHARS = 2048
MAX_SCHEDULER_CHARS = 64
# LoRA adapters per request (an export may allow fewer: `GET /v1/models`' `lora.max_per_request`), and the scale
# range: fal's LoRA `scale` range (0 to 4), and as far below 0, where a slider adapter runs its concept backwards.
MAX_LORAS = 4
MIN_LORA_SCALE = -4.0
MAX_LORA_SCALE = 4.0
DEFAULT_LORA_SCALE = 1.0
MAX_LORA_NAME_CHARS = 64
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Job priority (Baseten's async `priority`: 0-2): 0 bulk, 1 normal, 2 interactive; an API key may be limited to
# lower ones (`IMAGEN_API_KEYS_FILE`'s `max_priority=`). The longest a job may wait to start (`max_queue_s`, as
# Baseten's `max_time_in_queue_seconds`): at least 1 s, at most a day, like the retention of its result.
MIN_PRIORITY = 0
MAX_PRIORITY = 2
DEFAULT_PRIORITY = 1
MIN_MAX_QUEUE_S = 1.0
MAX_MAX_QUEUE_S = 86400.0
# A masked edit's mask blur (A1111's range and default): the Gaussian blur's sigma, in pixels at the processed
# size, applied to the mask before it is binarized (and used as is for the overlay).
MIN_MASK_BLUR = 0
MAX_MASK_BLUR = 64
DEFAULT_MASK_BLUR = 4
WEBHOOK_SCHEMES = ("http", "https")
WebhookEventName = Literal["start", "completed"]
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEventName)
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEventName, ...] = ("completed",)

# Documentation-only patterns: the validators below enforce the rules exactly (Python's notion of whitespace,
# urlsplit), the patterns let schema-driven clients refuse the obvious cases first.
NON_BLANK_PATTERN = r"\S"
WEBHOOK_URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://"

# `parse_image_to_image` passes the deployment's styles under this key of pydantic's validation context.
STYLES_CONTEXT = "styles"
# The error type of the cross-field rule int(steps * strength) >= 1 (a model-level error: no field in its loc).
EFFECTIVE_STEPS_ERROR = "effective_steps"
# The error type of the cross-field rule "no output_quality with png" (model-level too).
OUTPUT_QUALITY_ERROR = "output_quality_with_png"
# The error type of the cross-field rule "no mask_blur without a mask" (model-level too).
MASK_BLUR_ERROR = "mask_blur_without_mask"

OutputFormat = Literal["png", "jpeg", "webp"]


class WireJsonSchema(GenerateJsonSchema):
    """JSON Schema as the OpenAPI document has always spelled it: nullable as a type union, no field titles.

    A type union (`["integer", "null"]`) keeps `minimum`/`maxLength` beside `type`, where simple schema-driven
    clients (and the fuzz test's generator) look; a nullable `$ref` stays `anyOf` with null.
    """

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        generated = super().nullable_schema(schema)
        branches = generated.get("anyOf")
        if not (isinstance(branches, list) and len(branches) == 2 and branches[1] == {"type": "null"}):
            return generated
        inner = dict(branches[0])
        if not isinstance(inner.get("type"), str):
            return generated
        inner["type"] = [inner["type"], "null"]
        if "enum" in inner:
            inner["enum"] = [*inner["enum"], None]
        return {**{k: v for k, v in generated.items() if k != "anyOf"}, **inner}

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _absolute_http_url(value: str) -> str:
    """An absolute http(s) URL with a host and no whitespace or control characters (urlsplit would accept them)."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("whitespace or control character")
    parts = urlsplit(value)
    _ = parts.port  # raises ValueError on a malformed port
    if parts.scheme.lower() not in WEBHOOK_SCHEMES or not parts.hostname:
        raise ValueError("not an absolute http(s) URL")
    return value


def _distinct(value: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(value)) != len(value):
        raise ValueError("repeated event")
    return value


def _distinct_adapters(value: tuple[LoraRequest, ...]) -> tuple[LoraRequest, ...]:
    if len({lora.name for lora in value}) != len(value):
        raise ValueError("repeated adapter")
    return value


# Constrained types shared by the request and the job view, so both state the same ranges.
Strength = Annotated[float, Field(ge=MIN_STRENGTH, le=MAX_STRENGTH)]
Steps = Annotated[int, Field(ge=MIN_STEPS, le=MAX_STEPS)]
GuidanceScale = Annotated[float, Field(ge=MIN_GUIDANCE_SCALE, le=MAX_GUIDANCE_SCALE)]
Seed = Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)]
NumImages = Annotated[int, Field(ge=MIN_NUM_IMAGES, le=MAX_NUM_IMAGES)]
Positive = Annotated[int, Field(ge=1)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Url = Annotated[str, Field(json_schema_extra={"format": "uri"})]
NonBlank = Annotated[
    str, Field(min_length=1, json_schema_extra={"pattern": NON_BLANK_PATTERN}), AfterValidator(_non_blank)
]


class WireModel(BaseModel):
    """Immutable, unknown keys refused, no coercion (`30.0` is not an integer, `true` not a number), no NaN."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class LoraRequest(WireModel):
    """One LoRA adapter to apply, by its name in `GET /v1/loras`, at a scale (1: as trained; 0: off)."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_LORA_NAME_CHARS, pattern=LORA_NAME_PATTERN)] = Field(
        description="The adapter's name: its file in the LoRA folder without `.safetensors` (`GET /v1/loras`)."
    )
    scale: Annotated[float, Field(ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE)] = Field(
        default=DEFAULT_LORA_SCALE, description="How strongly it applies, as diffusers' `set_adapters` weight."
    )


Loras = Annotated[
    tuple[LoraRequest, ...], Field(max_length=MAX_LORAS, strict=False), AfterValidator(_distinct_adapters)
]


class ImageToImageRequest(WireModel):
    """Unknown fields, wrong types (`true` is not a number), NaN and out-of-range values are refused with 400 \
`invalid_request` naming the field. Fields with a default must be omitted rather than sent as null.

    Prompts may exceed what the text encoder reads: tokens past CLIP's 77-token window (after any style template \
is applied) are dropped, as in diffusers.
    """

    # `image` stays the raw wire string (URL, data URI or base64), which media.codecs decodes, or the bytes of an
    # uploaded file (the OpenAI form's); the document states the JSON body's string only.
    image: Annotated[
        Annotated[str, Field(min_length=1)] | Annotated[bytes, Field(min_length=1)],
        WithJsonSchema({"type": "string", "minLength": 1}),
    ] = Field(
        description=(
            "An http(s) URL, a base64 data URI (`data:image/png;base64,...`) or bare base64. JPEG, PNG or WebP "
            f"(recognised by content), at most {codecs.MAX_IMAGE_BYTES // 2**20} MB (413 `image_too_large`) "
            f"and {codecs.MAX_IMAGE_SIDE}x{codecs.MAX_IMAGE_SIDE} pixels (400 `image_dimensions_too_large`)."
        ),
    )
    prompt: Annotated[NonBlank, Field(max_length=MAX_PROMPT_CHARS)] = Field(
        description="Description of the desired transformation; not blank."
    )
    model: Annotated[NonBlank, Field(max_length=MAX_MODEL_CHARS)] = Field(
        default=DEFAULT_MODEL, description="A served pipeline (`GET /v1/models`); unknown -> 404 `model_not_found`."
    )
    strength: Strength = Field(default=DEFAULT_STRENGTH, description="How much to transform the image.")
    steps: Steps = Field(
        default=DEFAULT_STEPS,
        description=(
            "Inference steps (a JSON integer: `30.0` is refused). diffusers runs `int(steps * strength)` "
            "denoising steps, which must be at least 1."
        ),
    )
    guidance_scale: GuidanceScale = Field(
        default=DEFAULT_GUIDANCE_SCALE, description="Classifier-free guidance; at most 1 disables it."
    )
    negative_prompt: Annotated[str, Field(max_length=MAX_NEGATIVE_PROMPT_CHARS)] | None = Field(
        default=None, description="What to avoid."
    )
    seed: Seed | None = Field(default=None, description="Random when absent; image i uses seed + i.")
    num_images: NumImages = Field(default=DEFAULT_NUM_IMAGES, description="Number of variations.")
    style: str | None = Field(default=None, description="A preset from `GET /v1/styles`.")
    webhook_url: (
        Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_URL_CHARS), AfterValidator(_absolute_http_url)] | None
    ) = Field(
        default=None,
        description=(
            "Absolute http(s) URL. When given the job runs asynchronously: 202 at once, then the final job "
            "JSON is POSTed here, signed with the key's webhook secret (`GET /v1/webhook-secret`)."
        ),
        json_schema_extra={"format": "uri", "pattern": WEBHOOK_URL_PATTERN},
    )
    # A tuple keeps the request hashable; `strict=False` lets it come as a JSON array (items stay strict literals).
    webhook_events: Annotated[
        tuple[WebhookEventName, ...],
        Field(min_length=1, max_length=len(WEBHOOK_EVENTS), strict=False),
        AfterValidator(_distinct),
    ] = Field(
        default=DEFAULT_WEBHOOK_EVENTS,
        description=(
            "Which events are POSTed to `webhook_url` (Replicate's names): `start` when a worker begins the job, "
            "`completed` when it reaches any final state (completed, failed or canceled). Each distinct, at least "
            "one; without `webhook_url` it has no effect."
        ),
        json_schema_extra={"uniqueItems": True},
    )

    scheduler: Annotated[str, Field(min_length=1, max_length=MAX_SCHEDULER_CHARS)] | None = Field(
        default=None,
        description=(
            f"The sampler: {', '.join(SCHEDULER_NAMES)}, or the diffusers class name "
            f"({', '.join(SCHEDULER_NAMES.values())}). Configured from the model's own scheduler config as "
            "diffusers' `from_config` does; which ones a model takes, and its default (used when absent or "
            "null), are in `GET /v1/models` (`schedulers`, `default_scheduler`). Others -> 400 listing them."
        ),
    )
    output_format: OutputFormat = Field(
        default=codecs.DEFAULT_OUTPUT_FORMAT,
        description="Encoding of the output images (as Stability's `output_format`); no metadata is written.",
    )
    output_quality: Annotated[int, Field(ge=codecs.MIN_OUTPUT_QUALITY, le=codecs.MAX_OUTPUT_QUALITY)] | None = Field(
        default=None,
        description=(
            "JPEG/WebP quality (as Replicate's and fal's `output_quality`); default "
            + ", ".join(f"{fmt} {q}" for fmt, q in codecs.DEFAULT_OUTPUT_QUALITY.items())
            + ". PNG is lossless: a quality with png -> 400."
        ),
    )
    loras: Loras = Field(
        default=(),
        description=(
            f"LoRA adapters to apply, at most {MAX_LORAS} distinct ones (a model may allow fewer: `GET /v1/models`"
            "' `lora`), each `{name, scale}`; their effects add, as diffusers' `set_adapters`. Only models exported "
            "with LoRA slots take them; an unknown adapter, one made for another model family, or one this model "
            "cannot hold (rank, layers) -> 400 naming it. Requests with different adapters share the UNet's batches."
        ),
        json_schema_extra={"uniqueItems": True},
    )

    priority: Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)] = Field(
        default=DEFAULT_PRIORITY,
        description=(
            "0 bulk, 1 normal, 2 interactive. Queued jobs start highest priority first (fair between API keys "
            "within a priority), and a running job yields at its next denoising step to a higher-priority one; "
            "every Triton call of the job carries it. Above the API key's maximum -> 400."
        ),
    )
    max_queue_s: Annotated[float, Field(ge=MIN_MAX_QUEUE_S, le=MAX_MAX_QUEUE_S)] | None = Field(
        default=None,
        description=(
            "The longest the job may wait to start, in seconds; past it, a job not yet started fails with "
            "`queue_timeout` (503). Unlimited when absent."
        ),
    )
    cache: bool = Field(
        default=True,
        description=(
            "With an explicit `seed`, a request identical to an earlier completed one of the same API key (same "
            "image bytes, model and every generation parameter) is answered from its stored result, without "
            "running the model (`cached: true` in the job). `false` always runs it."
        ),
    )
    # `mask` is typed as `image` is (the OpenAI form uploads it as bytes), nullable because it has no default.
    mask: (
        Annotated[
            Annotated[str, Field(min_length=1)] | Annotated[bytes, Field(min_length=1)],
            WithJsonSchema({"type": "string", "minLength": 1}),
        ]
        | None
    ) = Field(
        default=None,
        description=(
            "A masked edit: which part of the image to change. Given as `image` is (URL, data URI or base64; "
            "JPEG, PNG or WebP; the same size limits). White changes, black keeps; grey is binarized at 50% after "
            "`mask_blur`. A mask with fully transparent pixels marks those instead (OpenAI's convention). Any "
            "size of the image's aspect ratio (within one pixel), resized to it; outside the mask the output "
            "keeps the input's pixels. Required by inpainting models (`GET /v1/models`' `inpainting`)."
        ),
    )
    mask_blur: Annotated[int, Field(ge=MIN_MASK_BLUR, le=MAX_MASK_BLUR)] | None = Field(
        default=None,
        description=(
            f"The mask's Gaussian blur, in pixels at the processed size (default {DEFAULT_MASK_BLUR} with a "
            "mask); it softens the seam. Only with a `mask` (else 400)."
        ),
    )

    @field_validator("style")
    @classmethod
    def _style_is_served(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Styles come from the validation context (the deployment's presets), else the built-in ones."""
        styles = (info.context or {}).get(STYLES_CONTEXT, STYLE_PRESETS)
        if value is not None and value not in styles:
            raise ValueError("unknown style")
        return value

    @model_validator(mode="after")
    def _runs_a_denoising_step(self) -> Self:
        # diffusers runs int(steps * strength) denoising steps; zero would return the input unchanged (or fail).
        if img2img_effective_steps(self.steps, self.strength) < 1:
            raise PydanticCustomError(EFFECTIVE_STEPS_ERROR, "steps x strength runs no denoising step")
        return self

    @model_validator(mode="after")
    def _quality_fits_format(self) -> Self:
        # A quality PNG would ignore is refused rather than silently dropped.
        if self.output_format == "png" and self.output_quality is not None:
            raise PydanticCustomError(OUTPUT_QUALITY_ERROR, "output_quality with png")
        return self

    @model_validator(mode="after")
    def _blur_needs_mask(self) -> Self:
        # A blur with nothing to blur is refused rather than silently dropped.
        if self.mask_blur is not None and self.mask is None:
            raise PydanticCustomError(MASK_BLUR_ERROR, "mask_blur without mask")
        return self


# --- what the request model enforces, read back for other modules and for the error messages ---------

FIELDS: tuple[str, ...] = tuple(ImageToImageRequest.model_fields)
REQUIRED_FIELDS: tuple[str, ...] = tuple(
    name for name, info in ImageToImageRequest.model_fields.items() if info.is_required()
)
_REQUEST_PROPERTIES: Mapping[str, Mapping[str, Any]] = ImageToImageRequest.model_json_schema(
    schema_generator=WireJsonSchema
)["properties"]


def _limits(name: str, prop: Mapping[str, Any]) -> Mapping[str, Any]:
    """One field's entry of PARAMETER_LIMITS, read off its JSON schema (numbers always state default/nullable)."""
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    kind = next(t for t in types if t != "null")
    nullable = "null" in types
    if "enum" in prop:
        return MappingProxyType({"type": kind, "enum": list(prop["enum"]), "default": prop.get("default")})
    if kind in ("integer", "number"):
        numeric: dict[str, Any] = {
            "type": kind,
            "minimum": prop["minimum"],
            "maximum": prop["maximum"],
            "default": prop.get("default"),
            "nullable": nullable,
        }
        if name == "output_quality":
            numeric["default_by_format"] = dict(codecs.DEFAULT_OUTPUT_QUALITY)
        if name == "mask_blur":  # null without a mask (else 400), this with one
            numeric["default_with_mask"] = DEFAULT_MASK_BLUR
        return MappingProxyType(numeric)
    limits: dict[str, Any] = {"type": kind, "max_length": prop["maxLength"]}
    if prop.get("default") is not None:
        limits["default"] = prop["default"]
    if nullable:
        limits["nullable"] = True
    if name == "webhook_url":
        limits["schemes"] = WEBHOOK_SCHEMES
    return MappingProxyType(limits)


# JSON-ready summary for `GET /v1/models` and the README: every field with a range or a length cap.
PARAMETER_LIMITS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        name: _limits(name, prop)
        for name, prop in _REQUEST_PROPERTIES.items()
        if "maximum" in prop or "maxLength" in prop or name == "output_format"
    }
)


def _rule(field: str) -> str:
    """The `details` of an invalid field: the rule it breaks, in words, from the limits the model enforces."""
    limits = PARAMETER_LIMITS[field]
    or_null = " or null" if limits.get("nullable") else ""
    if "enum" in limits:
        return f"'{field}' must be one of: {', '.join(limits['enum'])}"
    if limits["type"] == "string":
        non_empty = "non-empty " if "minLength" in _REQUEST_PROPERTIES[field] else ""
        return f"'{field}' must be a {non_empty}string of at most {limits['max_length']} characters{or_null}"
    integer = limits["type"] == "integer"
    low, high = (str(limits[k]) if integer else repr(float(limits[k])) for k in ("minimum", "maximum"))
    return f"'{field}' must be {'an integer' if integer else 'a number'} between {low} and {high}{or_null}"


_RULES: Mapping[str, str] = MappingProxyType(
    {
        **{field: _rule(field) for field in PARAMETER_LIMITS},
        "image": "'image' must be a non-empty string: an http(s) URL, a data URI or base64",
        "mask": "'mask' must be null or a non-empty string: an http(s) URL, a data URI or base64",
        "webhook_url": (
            "'webhook_url' must be null or an absolute http(s) URL with a host, "
            f"at most {MAX_WEBHOOK_URL_CHARS} characters"
        ),
        "webhook_events": (
            f"'webhook_events' must be a list of distinct events, at least one, of: {', '.join(WEBHOOK_EVENTS)}"
        ),
        "cache": "'cache' must be true or false",
        "loras": (
            f"'loras' must be a list of at most {MAX_LORAS} distinct adapters, each an object with 'name' (letters, "
            f"digits, '.', '_' or '-', at most {MAX_LORA_NAME_CHARS}) and an optional 'scale' between "
            f"{MIN_LORA_SCALE} and {MAX_LORA_SCALE}"
        ),
    }
)


# A body with several bad fields gets the first in FIELDS order, except these, reported after the rest: the
# order the hand-written validator checked in, kept so clients get the same answer as before.
_REPORTED_LAST = ("negative_prompt", "style", "webhook_url")


def _invalid(field: str, rule: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid field '{field}'", rule)


def _translate(error: ValidationError, styles: Mapping[str, StylePreset]) -> InvalidRequest:
    """Our message for the first problem: unknown fields (all listed), then a missing one, then the first field
    that breaks its rule (see _REPORTED_LAST), then the cross-field steps x strength rule."""
    problems = error.errors(include_url=False, include_input=False)
    # A top-level key only: an unknown key inside a field's object (a `loras` item) breaks that field's rule.
    unknown = [str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden" and len(p["loc"]) == 1]
    if unknown:
        listed = ", ".join(f"'{key}'" for key in unknown)
        return InvalidRequest(f"Unknown field(s): {listed}", f"Allowed fields: {', '.join(FIELDS)}")
    missing = [str(p["loc"][0]) for p in problems if p["type"] == "missing"]
    if missing:
        return InvalidRequest(f"Missing required field '{missing[0]}'", f"'{missing[0]}' is required")
    fields = sorted(
        {str(p["loc"][0]) for p in problems if p["loc"]}, key=lambda name: (name in _REPORTED_LAST, FIELDS.index(name))
    )
    if fields:
        field = fields[0]
        if field == "style":
            return _invalid("style", f"'style' must be one of: {', '.join(sorted(styles))}")
        return _invalid(field, _RULES[field])
    # Model-level rules run only once every field is valid: no quality with png, and steps x strength.
    if any(p["type"] == OUTPUT_QUALITY_ERROR for p in problems):
        return _invalid("output_quality", "'output_quality' applies to jpeg and webp only: omit it with png")
    if any(p["type"] == MASK_BLUR_ERROR for p in problems):
        return _invalid("mask_blur", "'mask_blur' applies only with a 'mask'")
    return _invalid("steps", "'steps' x 'strength' must be at least 1: raise 'steps' or 'strength'")


def parse_image_to_image(body: object, *, styles: Mapping[str, StylePreset]) -> ImageToImageRequest:
    """Validate a decoded JSON body and return the typed request; raise `InvalidRequest` on the first problem.

    `null` is accepted only where the field itself may be absent with no default (negative_prompt, seed,
    style, webhook_url); a field with a default must be omitted rather than sent as null.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", "Send a JSON object with 'image' and 'prompt'")
    try:
        return ImageToImageRequest.model_validate(body, context={STYLES_CONTEXT: styles})
    except ValidationError as error:
        raise _translate(error, styles) from None
