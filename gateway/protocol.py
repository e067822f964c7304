"""The wire schema of `POST /v1/image-to-image`, validated once at the edge.

Everything downstream receives an `ImageToImageRequest` whose fields already have the right types and ranges,
so no other module re-checks them. Limits and defaults are module constants (and `PARAMETER_LIMITS`) so the
OpenAPI document, the README and `GET /v1/models` quote the same numbers the validator enforces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import InvalidRequest
from gateway.pipeline import img2img_effective_steps
from gateway.styles import StylePreset

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
MIN_SEED = 0
MAX_SEED = 2**32 - 1  # numpy's legacy seeding range; what most clients expect a "seed" to be
MIN_NUM_IMAGES = 1
MAX_NUM_IMAGES = 4
MAX_PROMPT_CHARS = 2000
MAX_NEGATIVE_PROMPT_CHARS = 2000
MAX_MODEL_CHARS = 128
MAX_WEBHOOK_URL_CHARS = 2048
WEBHOOK_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImageToImageRequest:
    """A validated request. `image` is still the raw wire string (URL, data URI or base64): see codecs.

    Prompts may exceed what the text encoder reads: like diffusers, tokens past CLIP's 77-token window
    (after any style template is applied) are silently dropped, so `MAX_PROMPT_CHARS` only bounds the
    work and the echo, it does not promise that every word conditions the image.
    """

    image: str
    prompt: str
    model: str = DEFAULT_MODEL
    strength: float = DEFAULT_STRENGTH
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int = DEFAULT_NUM_IMAGES
    style: str | None = None
    webhook_url: str | None = None


@dataclass(frozen=True)
class _NumberRule:
    """Range rule of one numeric field; `integer` fields refuse floats (30.0), float fields take ints."""

    integer: bool
    minimum: float
    maximum: float
    default: float | None
    nullable: bool = False


_NUMBER_RULES: Mapping[str, _NumberRule] = MappingProxyType(
    {
        "strength": _NumberRule(False, MIN_STRENGTH, MAX_STRENGTH, DEFAULT_STRENGTH),
        "steps": _NumberRule(True, MIN_STEPS, MAX_STEPS, DEFAULT_STEPS),
        "guidance_scale": _NumberRule(False, MIN_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE),
        "seed": _NumberRule(True, MIN_SEED, MAX_SEED, None, nullable=True),
        "num_images": _NumberRule(True, MIN_NUM_IMAGES, MAX_NUM_IMAGES, DEFAULT_NUM_IMAGES),
    }
)

FIELDS: tuple[str, ...] = (
    "image",
    "prompt",
    "model",
    "strength",
    "steps",
    "guidance_scale",
    "negative_prompt",
    "seed",
    "num_images",
    "style",
    "webhook_url",
)
REQUIRED_FIELDS: tuple[str, ...] = ("image", "prompt")

# JSON-ready summary for `GET /v1/models`, the OpenAPI document and the README.
PARAMETER_LIMITS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        **{
            name: MappingProxyType(
                {
                    "type": "integer" if rule.integer else "number",
                    "minimum": int(rule.minimum) if rule.integer else rule.minimum,
                    "maximum": int(rule.maximum) if rule.integer else rule.maximum,
                    "default": rule.default,
                    "nullable": rule.nullable,
                }
            )
            for name, rule in _NUMBER_RULES.items()
        },
        "prompt": MappingProxyType({"type": "string", "max_length": MAX_PROMPT_CHARS}),
        "negative_prompt": MappingProxyType(
            {"type": "string", "max_length": MAX_NEGATIVE_PROMPT_CHARS, "nullable": True}
        ),
        "model": MappingProxyType({"type": "string", "max_length": MAX_MODEL_CHARS, "default": DEFAULT_MODEL}),
        "webhook_url": MappingProxyType(
            {
                "type": "string",
                "max_length": MAX_WEBHOOK_URL_CHARS,
                "schemes": WEBHOOK_SCHEMES,
                "nullable": True,
            }
        ),
    }
)


def _invalid(field: str, rule: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid field '{field}'", rule)


def _format_bound(value: float, integer: bool) -> str:
    return str(int(value)) if integer else repr(float(value))


def _number(field: str, value: object, rule: _NumberRule) -> int | float:
    """Check one numeric field; `bool` is excluded explicitly because Python treats True as 1."""
    kind = "an integer" if rule.integer else "a number"
    wording = (
        f"'{field}' must be {kind} between {_format_bound(rule.minimum, rule.integer)} "
        f"and {_format_bound(rule.maximum, rule.integer)}"
    )
    if rule.nullable:
        wording += " or null"
    allowed: tuple[type, ...] = (int,) if rule.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise _invalid(field, wording)
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(field, wording)
    # Compare before converting: a huge JSON integer would overflow float().
    if not rule.minimum <= value <= rule.maximum:
        raise _invalid(field, wording)
    return value if rule.integer else float(value)


def _string(field: str, value: object, max_chars: int, *, non_blank: bool, nullable: bool = False) -> str:
    wording = f"'{field}' must be a {'non-empty ' if non_blank else ''}string of at most {max_chars} characters"
    if nullable:
        wording += " or null"
    if not isinstance(value, str) or len(value) > max_chars or (non_blank and not value.strip()):
        raise _invalid(field, wording)
    return value


def _webhook_url(value: object) -> str:
    wording = (
        f"'webhook_url' must be null or an absolute http(s) URL with a host, at most {MAX_WEBHOOK_URL_CHARS} characters"
    )
    if not isinstance(value, str) or not value or len(value) > MAX_WEBHOOK_URL_CHARS:
        raise _invalid("webhook_url", wording)
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise _invalid("webhook_url", wording)
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise _invalid("webhook_url", wording) from None
    if parts.scheme.lower() not in WEBHOOK_SCHEMES or not parts.hostname:
        raise _invalid("webhook_url", wording)
    return value


def _style(value: object, styles: Mapping[str, StylePreset]) -> str:
    valid = ", ".join(sorted(styles))
    if not isinstance(value, str) or value not in styles:
        raise _invalid("style", f"'style' must be one of: {valid}")
    return value


def parse_image_to_image(body: object, *, styles: Mapping[str, StylePreset]) -> ImageToImageRequest:
    """Validate a decoded JSON body and return the typed request; raise `InvalidRequest` on the first problem.

    `null` is accepted only where the field itself may be absent with no default (negative_prompt, seed,
    style, webhook_url); a field with a default must be omitted rather than sent as null.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", "Send a JSON object with 'image' and 'prompt'")
    unknown = [key for key in body if key not in FIELDS]
    if unknown:
        listed = ", ".join(f"'{key}'" for key in unknown)
        raise InvalidRequest(f"Unknown field(s): {listed}", f"Allowed fields: {', '.join(FIELDS)}")
    for field in REQUIRED_FIELDS:
        if field not in body:
            raise InvalidRequest(f"Missing required field '{field}'", f"'{field}' is required")

    image = body["image"]
    if not isinstance(image, str) or not image:
        raise _invalid("image", "'image' must be a non-empty string: an http(s) URL, a data URI or base64")
    values: dict[str, Any] = {
        "image": image,
        "prompt": _string("prompt", body["prompt"], MAX_PROMPT_CHARS, non_blank=True),
    }
    if "model" in body:
        values["model"] = _string("model", body["model"], MAX_MODEL_CHARS, non_blank=True)
    for field, rule in _NUMBER_RULES.items():
        if field in body and not (rule.nullable and body[field] is None):
            values[field] = _number(field, body[field], rule)
    if body.get("negative_prompt") is not None:
        values["negative_prompt"] = _string(
            "negative_prompt",
            body["negative_prompt"],
            MAX_NEGATIVE_PROMPT_CHARS,
            non_blank=False,
            nullable=True,
        )
    if body.get("style") is not None:
        values["style"] = _style(body["style"], styles)
    if body.get("webhook_url") is not None:
        values["webhook_url"] = _webhook_url(body["webhook_url"])
    request = ImageToImageRequest(**values)
    if img2img_effective_steps(request.steps, request.strength) < 1:
        # diffusers runs int(steps * strength) denoising steps; zero would return the input unchanged (or fail).
        raise _invalid("steps", "'steps' x 'strength' must be at least 1: raise 'steps' or 'strength'")
    return request
