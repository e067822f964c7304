"""Wire schema: every validation rule, valid and invalid, the response models, and the style presets."""

from __future__ import annotations

import json
import math
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from gateway.diffusion.styles import STYLE_PRESETS, StylePreset, apply_style
from gateway.errors import ERROR_TABLE, InvalidRequest
from gateway.http.responses import error_body
from gateway.http.schema import ErrorBody, ErrorObject, JobView
from gateway.jobs import request as protocol
from gateway.jobs.request import ImageToImageRequest, parse_image_to_image
from gateway.media import codecs
from tests.helpers import SPEC_EXAMPLE

BASE: dict[str, Any] = {"image": "https://example.com/in.png", "prompt": "a cat"}


def parse(**overrides: Any) -> ImageToImageRequest:
    return parse_image_to_image({**BASE, **overrides}, styles=STYLE_PRESETS)


def test_defaults() -> None:
    request = parse()
    assert request == ImageToImageRequest(image=BASE["image"], prompt="a cat")
    assert (request.model, request.strength, request.steps, request.guidance_scale) == (
        "imagen-v2",
        0.7,
        30,
        7.5,
    )
    assert (
        request.negative_prompt,
        request.seed,
        request.num_images,
        request.style,
        request.webhook_url,
    ) == (
        None,
        None,
        1,
        None,
        None,
    )


def test_full_request_from_the_spec_example() -> None:
    body = {
        "image": "https://example.com/input-image.jpg",
        **SPEC_EXAMPLE,
        "seed": 42,
        "webhook_url": "https://hooks.example.com/done?x=1",
    }
    request = parse_image_to_image(json.loads(json.dumps(body)), styles=STYLE_PRESETS)
    for key, value in body.items():
        assert getattr(request, key) == value


VALID: list[tuple[str, Any, Any]] = [
    # (field, value sent, value parsed)
    ("prompt", "x", "x"),
    ("prompt", "  padded  ", "  padded  "),
    ("prompt", "é" * protocol.MAX_PROMPT_CHARS, "é" * protocol.MAX_PROMPT_CHARS),
    ("negative_prompt", None, None),
    ("negative_prompt", "", ""),
    ("negative_prompt", "n" * protocol.MAX_NEGATIVE_PROMPT_CHARS, "n" * protocol.MAX_NEGATIVE_PROMPT_CHARS),
    ("model", "m" * protocol.MAX_MODEL_CHARS, "m" * protocol.MAX_MODEL_CHARS),
    ("strength", 0.1, 0.1),
    ("strength", 1.0, 1.0),
    ("strength", 1, 1.0),
    ("steps", 1, 1),
    ("steps", 150, 150),
    ("guidance_scale", 0, 0.0),
    ("guidance_scale", 20, 20.0),
    ("guidance_scale", 12.25, 12.25),
    ("seed", 0, 0),
    ("seed", 4294967295, 4294967295),
    ("seed", None, None),
    ("num_images", 1, 1),
    ("num_images", 4, 4),
    ("style", "anime", "anime"),
    ("style", None, None),
    ("webhook_url", None, None),
    ("webhook_url", "http://example.com", "http://example.com"),
    ("webhook_url", "HTTPS://example.com:8443/cb", "HTTPS://example.com:8443/cb"),
    ("webhook_url", "https://" + "h" * 2030 + ".com", "https://" + "h" * 2030 + ".com"),
]


@pytest.mark.parametrize(("field", "sent", "parsed"), VALID)
def test_valid_values(field: str, sent: Any, parsed: Any) -> None:
    # steps=1 runs a denoising step only at full strength (int(steps * strength) >= 1).
    extra = {"strength": 1.0} if field == "steps" else {}
    value = getattr(parse(**{field: sent}, **extra), field)
    assert value == parsed
    assert type(value) is type(parsed)


INVALID: list[tuple[str, Any]] = [
    ("image", ""),
    ("image", None),
    ("image", 123),
    ("image", ["https://example.com/a.png"]),
    ("prompt", ""),
    ("prompt", "   \n\t"),
    ("prompt", None),
    ("prompt", 5),
    ("prompt", "x" * (protocol.MAX_PROMPT_CHARS + 1)),
    ("negative_prompt", 5),
    ("negative_prompt", ["a"]),
    ("negative_prompt", "x" * (protocol.MAX_NEGATIVE_PROMPT_CHARS + 1)),
    ("model", ""),
    ("model", "  "),
    ("model", None),
    ("model", 2),
    ("model", "m" * (protocol.MAX_MODEL_CHARS + 1)),
    ("strength", 0.09),
    ("strength", 1.01),
    ("strength", 0),
    ("strength", True),
    ("strength", "0.5"),
    ("strength", None),
    ("strength", math.nan),
    ("strength", math.inf),
    ("steps", 0),
    ("steps", 151),
    ("steps", 30.0),
    ("steps", 30.5),
    ("steps", True),
    ("steps", "30"),
    ("steps", None),
    ("steps", 10**400),
    ("guidance_scale", -0.01),
    ("guidance_scale", 20.01),
    ("guidance_scale", False),
    ("guidance_scale", -math.inf),
    ("guidance_scale", math.nan),
    ("guidance_scale", 10**400),
    ("seed", -1),
    ("seed", 4294967296),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "42"),
    ("num_images", 0),
    ("num_images", 5),
    ("num_images", 2.0),
    ("num_images", True),
    ("num_images", None),
    ("style", "no-such-style"),
    ("style", "Anime"),
    ("style", ""),
    ("style", 3),
    ("webhook_url", ""),
    ("webhook_url", "example.com/hook"),
    ("webhook_url", "/relative/hook"),
    ("webhook_url", "ftp://example.com/hook"),
    ("webhook_url", "file:///etc/passwd"),
    ("webhook_url", "https://"),
    ("webhook_url", "https:///path-only"),
    ("webhook_url", "https://exa mple.com/"),
    ("webhook_url", "https://example.com/\n"),
    ("webhook_url", "https://example.com:99999/"),
    ("webhook_url", "https://example.com:port/"),
    ("webhook_url", "https://" + "h" * 2040 + ".com"),
    ("webhook_url", 5),
    ("scheduler", ""),
    ("scheduler", 3),
    ("scheduler", "s" * (protocol.MAX_SCHEDULER_CHARS + 1)),
    ("output_format", "jpg"),
    ("output_format", "PNG"),
    ("output_format", "gif"),
    ("output_format", None),
    ("output_format", 1),
    ("output_quality", 0),
    ("output_quality", 101),
    ("output_quality", 90.0),
    ("output_quality", True),
    ("output_quality", "90"),
    ("loras", "ink"),
    ("loras", None),
    ("loras", [{"name": "a/b"}]),
    ("loras", [{"name": ""}]),
    ("loras", [{"name": "n" * (protocol.MAX_LORA_NAME_CHARS + 1)}]),
    ("loras", [{"name": "ink", "scale": protocol.MAX_LORA_SCALE + 0.5}]),
    ("loras", [{"name": "ink", "scale": "1"}]),
    ("loras", [{"name": "ink", "weight": 1}]),  # an unknown key inside an adapter breaks the field's rule
    ("loras", [{"name": "ink"}, {"name": "ink"}]),
    ("loras", [{"name": f"a{i}"} for i in range(protocol.MAX_LORAS + 1)]),
]


@pytest.mark.parametrize(("field", "sent"), INVALID)
def test_invalid_values_name_the_field(field: str, sent: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**{field: sent})
    assert info.value.message == f"Invalid field '{field}'"
    assert info.value.details
    assert f"'{field}'" in info.value.details


@pytest.mark.parametrize(
    ("field", "sent", "fragment"),
    [
        ("steps", 151, "integer between 1 and 150"),
        ("strength", 2, "number between 0.1 and 1.0"),
        ("guidance_scale", 21, "number between 0.0 and 20.0"),
        ("seed", -1, "integer between 0 and 4294967295 or null"),
        ("num_images", 9, "integer between 1 and 4"),
        ("prompt", "", "at most 2000 characters"),
        ("negative_prompt", 1, "or null"),
        ("model", "", "at most 128 characters"),
        ("webhook_url", "ftp://x", "http(s)"),
    ],
)
def test_details_state_the_rule(field: str, sent: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**{field: sent})
    assert fragment in (info.value.details or "")


def test_style_error_lists_valid_styles() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(style="vaporwave-deluxe")
    details = info.value.details or ""
    for name in STYLE_PRESETS:
        assert name in details


def test_style_checked_against_the_given_mapping() -> None:
    custom = {"mine": StylePreset("mine", "{prompt}!", "")}
    request = parse_image_to_image({**BASE, "style": "mine"}, styles=custom)
    assert request.style == "mine"
    with pytest.raises(InvalidRequest):
        parse_image_to_image({**BASE, "style": "anime"}, styles=custom)


@pytest.mark.parametrize("body", [None, [], [BASE], "text", 3, True])
def test_body_must_be_an_object(body: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_image_to_image(body, styles=STYLE_PRESETS)
    assert "JSON object" in info.value.message


@pytest.mark.parametrize("missing", ["image", "prompt"])
def test_required_fields(missing: str) -> None:
    body = {key: value for key, value in BASE.items() if key != missing}
    with pytest.raises(InvalidRequest) as info:
        parse_image_to_image(body, styles=STYLE_PRESETS)
    assert f"'{missing}'" in info.value.message


def test_unknown_fields_are_listed() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_image_to_image({**BASE, "sampler": "ddim", "width": 512}, styles=STYLE_PRESETS)
    assert "'sampler'" in info.value.message
    assert "'width'" in info.value.message
    assert "webhook_url" in (info.value.details or "")


def test_request_is_frozen() -> None:
    request = parse()
    with pytest.raises(ValidationError, match="frozen"):
        request.steps = 5  # type: ignore[misc]
    assert hash(request) == hash(parse())


def test_parameter_limits_match_the_constants() -> None:
    limits = protocol.PARAMETER_LIMITS
    assert limits["steps"]["minimum"] == 1
    assert limits["steps"]["maximum"] == protocol.MAX_STEPS == 150
    assert limits["steps"]["default"] == protocol.DEFAULT_STEPS == 30
    assert limits["strength"] == {
        "type": "number",
        "minimum": 0.1,
        "maximum": 1.0,
        "default": 0.7,
        "nullable": False,
    }
    assert limits["seed"]["maximum"] == 2**32 - 1
    assert limits["seed"]["nullable"] is True
    assert limits["num_images"]["maximum"] == 4
    assert limits["guidance_scale"]["default"] == 7.5
    assert limits["prompt"]["max_length"] == protocol.MAX_PROMPT_CHARS == 2000
    assert limits["model"]["default"] == "imagen-v2"
    json.dumps({key: dict(value) for key, value in limits.items()})  # JSON-ready


def test_model_defaults_are_the_constants() -> None:
    request = ImageToImageRequest(image="i", prompt="p")
    assert request.model == protocol.DEFAULT_MODEL
    assert request.strength == protocol.DEFAULT_STRENGTH
    assert request.steps == protocol.DEFAULT_STEPS
    assert request.guidance_scale == protocol.DEFAULT_GUIDANCE_SCALE
    assert request.num_images == protocol.DEFAULT_NUM_IMAGES
    assert tuple(ImageToImageRequest.model_fields) == protocol.FIELDS
    assert protocol.FIELDS == ("image", "prompt", "model", "strength", "steps", "guidance_scale",
                               "negative_prompt", "seed", "num_images", "style", "webhook_url",
                               "webhook_events", "scheduler", "output_format", "output_quality",
                               "loras", "priority", "max_queue_s", "cache", "mask", "mask_blur")  # fmt: skip
    assert protocol.REQUIRED_FIELDS == ("image", "prompt")


# The exact `details` of each field's error (the error table of the integration tests quotes fragments).
RULES: dict[str, str] = {
    "image": "'image' must be a non-empty string: an http(s) URL, a data URI or base64",
    "prompt": "'prompt' must be a non-empty string of at most 2000 characters",
    "model": "'model' must be a non-empty string of at most 128 characters",
    "strength": "'strength' must be a number between 0.1 and 1.0",
    "steps": "'steps' must be an integer between 1 and 150",
    "guidance_scale": "'guidance_scale' must be a number between 0.0 and 20.0",
    "negative_prompt": "'negative_prompt' must be a string of at most 2000 characters or null",
    "seed": "'seed' must be an integer between 0 and 4294967295 or null",
    "num_images": "'num_images' must be an integer between 1 and 4",
    "style": "'style' must be one of: " + ", ".join(sorted(STYLE_PRESETS)),
    "webhook_url": "'webhook_url' must be null or an absolute http(s) URL with a host, at most 2048 characters",
    "scheduler": "'scheduler' must be a non-empty string of at most 64 characters or null",
    "output_format": "'output_format' must be one of: png, jpeg, webp",
    "output_quality": "'output_quality' must be an integer between 1 and 100 or null",
    "loras": "'loras' must be a list of at most 4 distinct adapters, each an object with 'name' (letters, digits, "
    "'.', '_' or '-', at most 64) and an optional 'scale' between -4.0 and 4.0",
}


@pytest.mark.parametrize(("field", "sent"), INVALID)
def test_invalid_values_get_the_exact_rule(field: str, sent: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**{field: sent})
    assert (info.value.message, info.value.details) == (f"Invalid field '{field}'", RULES[field])


@pytest.mark.parametrize(
    ("body", "message", "details"),
    [
        # Unknown fields first (all of them, in body order), then a missing field, then the first bad field.
        (
            {"steps": 0, "zeta": 1, "alpha": 2},
            "Unknown field(s): 'zeta', 'alpha'",
            "Allowed fields: " + ", ".join(protocol.FIELDS),
        ),
        ({"prompt": 5, "steps": 0}, "Missing required field 'image'", "'image' is required"),
        ({"image": 5}, "Missing required field 'prompt'", "'prompt' is required"),
        ({**BASE, "webhook_url": 5, "steps": 0, "strength": 5}, "Invalid field 'strength'", RULES["strength"]),
        # The nullable extras are reported after the numbers, as the hand-written validator did.
        ({**BASE, "negative_prompt": 5, "num_images": 9}, "Invalid field 'num_images'", RULES["num_images"]),
        ({**BASE, "style": "x", "negative_prompt": 5}, "Invalid field 'negative_prompt'", RULES["negative_prompt"]),
        (
            {**BASE, "steps": 1},
            "Invalid field 'steps'",
            "'steps' x 'strength' must be at least 1: raise 'steps' or 'strength'",
        ),
    ],
)
def test_which_problem_is_reported_first(body: dict[str, Any], message: str, details: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_image_to_image(body, styles=STYLE_PRESETS)
    assert (info.value.message, info.value.details) == (message, details)


@pytest.mark.parametrize(
    "overrides", [{"steps": 30.0}, {"steps": True}, {"strength": math.nan}, {"steps": 1}, {"style": "nope"}, {"x": 1}]
)
def test_the_model_enforces_the_rules_when_built_directly(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ImageToImageRequest(image="i", prompt="p", **overrides)


# --- styles -----------------------------------------------------------------------------------------------

REQUIRED_STYLES = [
    "cyberpunk",
    "artistic",
    "realistic",
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "modeling-compound",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
    "watercolor",
    "oil-painting",
]


@pytest.mark.parametrize("name", REQUIRED_STYLES)
def test_required_presets_exist_and_are_well_formed(name: str) -> None:
    preset = STYLE_PRESETS[name]
    assert preset.name == name
    assert preset.prompt_template.count("{prompt}") == 1
    assert preset.negative_prompt.strip()


def test_preset_without_placeholder_is_rejected() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        StylePreset("bad", "no placeholder", "")
    with pytest.raises(ValueError, match="exactly once"):
        StylePreset("bad", "{prompt} {prompt}", "")


STYLE = StylePreset("test", "oil painting of {prompt}, canvas", "photo, 3d")

APPLY_CASES: list[tuple[str, str | None, StylePreset | None, tuple[str, str]]] = [
    ("a cat", None, None, ("a cat", "")),
    ("a cat", "blurry", None, ("a cat", "blurry")),
    ("a cat", "  ", None, ("a cat", "")),
    ("a cat", None, STYLE, ("oil painting of a cat, canvas", "photo, 3d")),
    ("a cat", "", STYLE, ("oil painting of a cat, canvas", "photo, 3d")),
    ("a cat", "blurry, dark", STYLE, ("oil painting of a cat, canvas", "blurry, dark, photo, 3d")),
    ("a cat", "blurry", StylePreset("n", "{prompt}", ""), ("a cat", "blurry")),
    # Braces in the user's prompt are text, not template fields.
    ("{x} {prompt}", None, STYLE, ("oil painting of {x} {prompt}, canvas", "photo, 3d")),
]


@pytest.mark.parametrize(("prompt", "negative", "style", "expected"), APPLY_CASES)
def test_apply_style(prompt: str, negative: str | None, style: StylePreset | None, expected: tuple[str, str]) -> None:
    assert apply_style(prompt, negative, style) == expected


@pytest.mark.parametrize(("steps", "strength"), [(1, 0.7), (5, 0.1), (9, 0.1)])
def test_steps_times_strength_must_run_a_step(steps: int, strength: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(steps=steps, strength=strength)
    assert "'steps'" in info.value.message
    assert "strength" in (info.value.details or "")


def test_steps_times_strength_of_one_is_enough() -> None:
    assert parse(steps=10, strength=0.1).steps == 10


@pytest.mark.parametrize("quality", [1, 90, 100])
def test_a_quality_with_png_is_refused(quality: int) -> None:
    for sent in ({"output_quality": quality}, {"output_format": "png", "output_quality": quality}):
        with pytest.raises(InvalidRequest) as info:
            parse(**sent)
        assert (info.value.message, info.value.details) == (
            "Invalid field 'output_quality'",
            "'output_quality' applies to jpeg and webp only: omit it with png",
        )


@pytest.mark.parametrize(("fmt", "quality"), [("jpeg", None), ("jpeg", 1), ("webp", 100), ("png", None)])
def test_output_format_and_quality_accepted(fmt: str, quality: int | None) -> None:
    request = parse(output_format=fmt, **({} if quality is None else {"output_quality": quality}))
    assert (request.output_format, request.output_quality) == (fmt, quality)


def test_output_format_default_and_limits() -> None:
    assert parse().output_format == "png" and parse().output_quality is None and parse().scheduler is None
    limits = protocol.PARAMETER_LIMITS
    assert limits["output_format"] == {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"}
    assert limits["output_quality"]["minimum"] == 1 and limits["output_quality"]["maximum"] == 100
    assert limits["output_quality"]["default_by_format"] == {"jpeg": 90, "webp": 90}
    assert get_args(protocol.OutputFormat) == codecs.OUTPUT_FORMATS == tuple(codecs.OUTPUT_EXTENSIONS)


# --- response models --------------------------------------------------------------------------------------
# Views built by hand in the exact shape `ImageService.view(job, progress)` returns.

COMPLETED_VIEW: dict[str, Any] = {
    "id": "job_1",
    "status": "completed",
    "prompt": "a cat",
    "negative_prompt": None,
    "model": "imagen-v2",
    "strength": 0.7,
    "steps": 30,
    "guidance_scale": 7.5,
    "seed": 42,
    "style": "anime",
    "num_images": 2,
    "webhook_url": None,
    "created_at": "2024-01-15T10:30:00.000Z",
    "started_at": "2024-01-15T10:30:01.500Z",
    "completed_at": "2024-01-15T10:30:20.123Z",
    "original_image": {"url": "https://example.com/in.png", "width": 640, "height": 480},
    "processed_size": {"width": 512, "height": 384},
    "effective_steps": 21,
    "scheduler": "euler",
    "output_format": "webp",
    "output_quality": 90,
    "loras": [{"name": "ink", "scale": 0.8}],
    "priority": 2,
    "max_queue_s": 30.0,
    "cached": False,
    "masked": False,
    "mask_blur": None,
    "images": [
        {
            "url": "http://t/v1/images/job_1_0.webp",
            "width": 512,
            "height": 384,
            "seed": 42,
            "content_type": "image/webp",
            "sha256": "0" * 64,
        },
        {  # an image stored before the digest existed
            "url": "http://t/v1/images/job_1_1.webp",
            "width": 512,
            "height": 384,
            "seed": 43,
            "content_type": "image/webp",
            "sha256": None,
        },
    ],
    "progress": {
        "step": 21,
        "total_steps": 21,
        "queue_position": None,
        "estimated_start_at": None,
        "estimated_finish_at": None,
    },
    "error": None,
    "webhook": None,
}
QUEUED_VIEW: dict[str, Any] = {
    **COMPLETED_VIEW,
    "status": "queued",
    "negative_prompt": "blurry",
    "seed": 4294967295,
    "style": None,
    "webhook_url": "https://hooks.example/x",
    "started_at": None,
    "completed_at": None,
    "max_queue_s": None,
    "images": [],
    "progress": {
        "step": 0,
        "total_steps": 21,
        "queue_position": 3,
        "estimated_start_at": "2024-01-15T10:30:04.000Z",
        "estimated_finish_at": "2024-01-15T10:30:09.250Z",
    },
    "webhook": {"url": "https://hooks.example/x", "status": "pending", "attempts": []},
}
FAILED_VIEW: dict[str, Any] = {
    **QUEUED_VIEW,
    "status": "failed",
    "completed_at": "2024-01-15T10:30:25.000Z",
    "progress": None,
    "error": {"code": "backend_unavailable", "message": "Inference backend unavailable", "details": None},
    "webhook": {
        "url": "https://hooks.example/x",
        "status": "failed",
        "attempts": [
            {"at": "2024-01-15T10:30:26.000Z", "status_code": 500, "error": None},
            {"at": "2024-01-15T10:30:28.000Z", "status_code": None, "error": "ConnectError: refused"},
        ],
    },
}


@pytest.mark.parametrize("view", [COMPLETED_VIEW, QUEUED_VIEW, FAILED_VIEW], ids=["completed", "queued", "failed"])
def test_job_view_round_trips_the_service_view(view: dict[str, Any]) -> None:
    dumped = JobView.model_validate(view).model_dump(mode="json")
    assert json.dumps(dumped) == json.dumps(view)  # same keys, same order, same values and types
    assert JobView.model_validate_json(json.dumps(view)) == JobView.model_validate(view)


@pytest.mark.parametrize(
    "bad",
    [
        {**COMPLETED_VIEW, "extra": 1},
        {k: v for k, v in COMPLETED_VIEW.items() if k != "webhook"},
        {**COMPLETED_VIEW, "status": "done"},
        {**COMPLETED_VIEW, "steps": 30.0},
        {**COMPLETED_VIEW, "images": [{"url": "u", "width": 1, "height": 1}]},
        {**COMPLETED_VIEW, "images": [{**COMPLETED_VIEW["images"][0], "content_type": "image/gif"}]},
        {**COMPLETED_VIEW, "images": [{**COMPLETED_VIEW["images"][0], "sha256": "ABC"}]},
        {**COMPLETED_VIEW, "output_format": "gif"},
        {**FAILED_VIEW, "error": {"code": "made_up", "message": "x", "details": None}},
        {**FAILED_VIEW, "webhook": {**FAILED_VIEW["webhook"], "attempts": [{"at": "t", "status": 500, "error": None}]}},
    ],
)
def test_job_view_refuses_a_drifted_shape(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobView.model_validate(bad)


@pytest.mark.parametrize("code", sorted({code for _, code in ERROR_TABLE.values()}))
def test_error_body_round_trips_every_code_of_the_error_table(code: str) -> None:
    body = error_body(code, "Something", None)
    assert ErrorBody.model_validate(body).model_dump(mode="json") == body
    assert ErrorObject(code=code, message="m", details="d").model_dump(mode="json") == {
        "code": code,
        "message": "m",
        "details": "d",
    }


def test_error_object_refuses_unknown_codes_and_empty_messages() -> None:
    with pytest.raises(ValidationError):
        ErrorObject(code="made_up", message="m", details=None)
    with pytest.raises(ValidationError):
        ErrorObject(code="not_found", message="", details=None)


def test_mask_blur_limits_state_the_default_with_a_mask() -> None:
    """null without a mask, DEFAULT_MASK_BLUR with one: the playground's placeholder reads it from here."""
    limits = protocol.PARAMETER_LIMITS["mask_blur"]
    assert limits["default"] is None and limits["nullable"] is True
    assert (limits["minimum"], limits["maximum"], limits["default_with_mask"]) == (0, 64, 4)
