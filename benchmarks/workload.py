"""The one request every system serves: a deterministic 512x512 image and the API body around it."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.config import Workload


def input_image(side: int = 512) -> Image.Image:
    """Smooth gradients plus fixed noise: deterministic, photo-like enough that PNG does not collapse it."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rng = np.random.default_rng(7)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 200 + rng.normal(0, 12, (side, side, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(workload: Workload, model: str) -> dict[str, Any]:
    """The public API body (/work/shared/spec/image-to-image-api.md); the peers accept the same JSON."""
    data = base64.b64encode(png_bytes(input_image(workload.image_side))).decode("ascii")
    return {
        "image": f"data:image/png;base64,{data}",
        "prompt": workload.prompt,
        "negative_prompt": workload.negative_prompt,
        "model": model,
        "strength": workload.strength,
        "steps": workload.steps,
        "guidance_scale": workload.guidance_scale,
        "seed": workload.seed,
        "num_images": 1,
    }
