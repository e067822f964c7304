"""Style presets as data: a prompt template and a negative prompt per `style` value.

The names follow the spec's examples (`cyberpunk`, `artistic`, `realistic`) plus the `style_preset` values
hosted image APIs commonly accept, so clients can switch providers without renaming styles. A preset only
rewrites text; it never changes sampling parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

PROMPT_PLACEHOLDER = "{prompt}"
NEGATIVE_PROMPT_SEPARATOR = ", "


@dataclass(frozen=True)
class StylePreset:
    """One style: `prompt_template` holds `{prompt}` exactly once, where the user's prompt goes."""

    name: str
    prompt_template: str
    negative_prompt: str

    def __post_init__(self) -> None:
        if self.prompt_template.count(PROMPT_PLACEHOLDER) != 1:
            raise ValueError(f"style {self.name!r}: template must contain {PROMPT_PLACEHOLDER} exactly once")


_COMMON_NEGATIVE = "ugly, deformed, disfigured, blurry, low quality"

_PRESETS: tuple[StylePreset, ...] = (
    # The spec's own examples.
    StylePreset(
        "cyberpunk",
        "cyberpunk style {prompt}, neon lights, futuristic city, high-tech, rain-soaked streets, "
        "vivid magenta and cyan, highly detailed",
        f"{_COMMON_NEGATIVE}, daylight, pastoral, muted colors",
    ),
    StylePreset(
        "artistic",
        "artistic rendition of {prompt}, expressive brushwork, painterly, rich colors, fine art, masterpiece",
        f"{_COMMON_NEGATIVE}, photo, photorealistic, 3d render",
    ),
    StylePreset(
        "realistic",
        "realistic photo of {prompt}, natural lighting, sharp focus, true-to-life colors, highly detailed",
        f"{_COMMON_NEGATIVE}, painting, drawing, cartoon, anime, illustration, cgi",
    ),
    # Common hosted-API `style_preset` values.
    StylePreset(
        "3d-model",
        "professional 3d model of {prompt}, octane render, volumetric lighting, highly detailed",
        f"{_COMMON_NEGATIVE}, noisy, painting, sketch",
    ),
    StylePreset(
        "analog-film",
        "analog film photo of {prompt}, 35mm, film grain, faded colors, vignette, vintage",
        f"{_COMMON_NEGATIVE}, painting, drawing, illustration, digital",
    ),
    StylePreset(
        "anime",
        "anime artwork of {prompt}, anime style, key visual, vibrant, studio anime, highly detailed",
        f"{_COMMON_NEGATIVE}, photo, realism, black and white",
    ),
    StylePreset(
        "cinematic",
        "cinematic film still of {prompt}, shallow depth of field, bokeh, moody lighting, epic, film grain",
        f"{_COMMON_NEGATIVE}, cartoon, anime, painting, text",
    ),
    StylePreset(
        "comic-book",
        "comic book art of {prompt}, graphic novel illustration, bold ink lines, vibrant, highly detailed",
        f"{_COMMON_NEGATIVE}, photograph, realistic, stock photo",
    ),
    StylePreset(
        "digital-art",
        "digital art of {prompt}, concept art, illustrative, painterly, matte painting, highly detailed",
        f"{_COMMON_NEGATIVE}, photo, photorealistic",
    ),
    StylePreset(
        "enhance",
        "{prompt}, breathtaking, award-winning, professional, highly detailed",
        f"{_COMMON_NEGATIVE}, noisy, distorted, grainy",
    ),
    StylePreset(
        "fantasy-art",
        "ethereal fantasy concept art of {prompt}, magical, majestic, dreamy, painterly, epic cover art",
        f"{_COMMON_NEGATIVE}, photographic, realistic, text, cropped",
    ),
    StylePreset(
        "isometric",
        "isometric style {prompt}, vibrant, crisp, clean geometry, intricate, ultra detailed",
        f"{_COMMON_NEGATIVE}, realistic, photographic, perspective distortion",
    ),
    StylePreset(
        "line-art",
        "line art drawing of {prompt}, clean lines, minimalist, vector graphics, professional",
        f"{_COMMON_NEGATIVE}, photorealistic, shading, color, oil, acrylic",
    ),
    StylePreset(
        "low-poly",
        "low-poly style {prompt}, polygon mesh, faceted, blocky, low-poly game art, centered composition",
        f"{_COMMON_NEGATIVE}, noisy, highly textured, photo",
    ),
    StylePreset(
        "modeling-compound",
        "clay sculpture of {prompt}, modeling compound, play-dough style, claymation, handmade",
        f"{_COMMON_NEGATIVE}, photo, highly textured, messy",
    ),
    StylePreset(
        "neon-punk",
        "neon punk style {prompt}, cyberpunk, vaporwave, neon glow, magenta highlights, dark purple shadows, "
        "high contrast",
        f"{_COMMON_NEGATIVE}, painting, drawing, dull colors",
    ),
    StylePreset(
        "origami",
        "origami style {prompt}, folded paper art, pleats, crisp folds, centered composition",
        f"{_COMMON_NEGATIVE}, photo, messy, highly textured",
    ),
    StylePreset(
        "photographic",
        "professional photograph of {prompt}, 35mm, bokeh, natural light, 4k, highly detailed",
        f"{_COMMON_NEGATIVE}, drawing, painting, sketch, cartoon",
    ),
    StylePreset(
        "pixel-art",
        "pixel art of {prompt}, 8-bit graphics, low resolution, blocky pixels, retro game sprite",
        f"{_COMMON_NEGATIVE}, photo, realistic, smooth gradients",
    ),
    StylePreset(
        "tile-texture",
        "seamless tileable texture of {prompt}, top-down, flat lighting, repeating pattern",
        f"{_COMMON_NEGATIVE}, perspective, shadows, borders, text",
    ),
    # Frequently requested painting styles.
    StylePreset(
        "watercolor",
        "watercolor painting of {prompt}, soft washes, bleeding colors, paper texture, delicate",
        f"{_COMMON_NEGATIVE}, photo, photorealistic, 3d render, harsh lines",
    ),
    StylePreset(
        "oil-painting",
        "oil painting of {prompt}, thick impasto brushstrokes, canvas texture, classical, rich colors",
        f"{_COMMON_NEGATIVE}, photo, photorealistic, 3d render, digital art",
    ),
)

STYLE_PRESETS: Mapping[str, StylePreset] = MappingProxyType({preset.name: preset for preset in _PRESETS})


def apply_style(prompt: str, negative_prompt: str | None, style: StylePreset | None) -> tuple[str, str]:
    """Return the (prompt, negative prompt) actually encoded.

    The user's negative prompt comes first so it survives CLIP's 77-token truncation; the style's follows.
    Empty parts are skipped; the negative prompt is "" when there is none (diffusers then encodes "" for the
    unconditional branch, same as no negative prompt).
    """
    final_prompt = prompt if style is None else style.prompt_template.replace(PROMPT_PLACEHOLDER, prompt)
    parts = [negative_prompt, None if style is None else style.negative_prompt]
    final_negative = NEGATIVE_PROMPT_SEPARATOR.join(p.strip() for p in parts if p is not None and p.strip())
    return final_prompt, final_negative
