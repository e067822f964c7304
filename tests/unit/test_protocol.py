"""Wire schema: every validation rule, valid and invalid, plus the style presets it refers to."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gateway import protocol
from gateway.errors import InvalidRequest
from gateway.protocol import ImageToImageRequest, parse_image_to_image
from gateway.styles import STYLE_PRESETS, StylePreset, apply_style
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
    with pytest.raises(AttributeError):
        request.steps = 5  # type: ignore[misc]


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


def test_dataclass_defaults_are_the_constants() -> None:
    request = ImageToImageRequest(image="i", prompt="p")
    assert request.model == protocol.DEFAULT_MODEL
    assert request.strength == protocol.DEFAULT_STRENGTH
    assert request.steps == protocol.DEFAULT_STEPS
    assert request.guidance_scale == protocol.DEFAULT_GUIDANCE_SCALE
    assert request.num_images == protocol.DEFAULT_NUM_IMAGES
    assert set(protocol.FIELDS) == set(ImageToImageRequest.__dataclass_fields__)


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
