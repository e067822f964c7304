"""Issue 20, item 3: the published widths and conditioning dimensions end to end, at a cost CI can pay.

`export.tiny` size `widths` has SD 1.5's 768-wide text encoder and cross-attention, and SDXL's 768- and
1280-wide text encoders (cross-attention 2048 = 768 + 1280, the added embedding 2816 = 6 x 256 + 1280, a
1280-wide pooled projection), with attention heads of 64, but one UNet layer per block, two text layers and a
128 px native size. Unlike the tiny models, whose SDXL encoders are equally wide, any mix-up of two of these
dimensions fails here. Both are exported from a diffusers folder with the export's own check on, served by a
Triton of this module's own (SDXL in both runtimes) and the real gateway, and compared with diffusers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions
from export.tiny import build_random_pipeline
from gateway.diffusion.manifest import PipelineManifest, load_manifests
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, start_own_triton
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image

pytestmark = pytest.mark.integration

# name -> (arch, seed, scheduler, runtime)
PIPELINES = {
    "widths-sd": ("sd", 3, "pndm", "onnxruntime"),
    "widths-xl": ("sdxl", 4, "euler", "onnxruntime"),
    "widths-xl-torch": ("sdxl", 4, "euler", "torch"),
}


@dataclass(frozen=True)
class Served:
    url: str
    repository: Path
    sources: dict[str, Path]  # the diffusers folder each pipeline was exported from
    manifests: dict[str, PipelineManifest]


@pytest.fixture(scope="module")
def widths(tmp_path_factory: pytest.TempPathFactory, make_gateway: GatewayFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("widths")
    repo = root / "models"
    sources: dict[str, Path] = {}
    for name, (arch, seed, scheduler, runtime) in PIPELINES.items():
        folder = root / f"diffusers-{arch}-{seed}"
        if not folder.exists():  # the SDXL weights are exported twice, once per runtime
            build_random_pipeline(folder, size="widths", seed=seed, scheduler=scheduler, arch=arch)
        sources[name] = folder
        request = ExportRequest(model_dir=folder, repository=repo, name=name, options=ServingOptions(runtime=runtime))
        run_export(request, progress=False)  # the export's own check on, at these widths
    manifests = load_manifests(repo)
    server = start_own_triton(repo, root / "tritonserver.log")
    try:
        server.wait_ready([m for manifest in manifests.values() for m in manifest.models], timeout_s=300)
        with make_gateway(model_repository=repo, triton_url=server.grpc_url) as url:
            yield Served(url, repo, sources, manifests)
    finally:
        server.stop()


def test_the_manifests_carry_the_published_conditioning_dimensions(widths: Served) -> None:
    sd = json.loads((widths.repository / "widths-sd.pipeline.json").read_text())
    assert sd["components"]["unet"]["inputs"]["encoder_hidden_states"]["shape"] == [-1, 77, 768]
    assert sd["components"]["text_encoder"]["outputs"]["last_hidden_state"]["shape"] == [-1, 77, 768]
    for name in ("widths-xl", "widths-xl-torch"):
        xl = json.loads((widths.repository / f"{name}.pipeline.json").read_text())
        unet = xl["components"]["unet"]["inputs"]
        assert unet["encoder_hidden_states"]["shape"] == [-1, 77, 2048], name
        assert (unet["text_embeds"]["shape"], unet["time_ids"]["shape"]) == ([-1, 1280], [-1, 6]), name
        assert [t["hidden_size"] for t in xl["text_encoders"]] == [768, 1280], name
        second = xl["components"]["text_encoder_2"]["outputs"]
        assert second["hidden_states"] == {"name": "hidden_states.1", "datatype": "FP32", "shape": [-1, 77, 1280]}
        assert second["text_embeds"]["shape"] == [-1, 1280]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_real_widths_serve_what_diffusers_makes(widths: Served, auth: dict[str, str], name: str) -> None:
    source = make_image(128, 96, seed=13, fmt="PNG")
    body = {
        "image": data_uri(source),
        "prompt": "a harbour at dawn, oil on canvas",
        "negative_prompt": "blurry",
        "model": name,
        "strength": 0.7,
        "steps": 8,
        "guidance_scale": 6.0,
        "seed": 2024,
    }
    _, served = serve_first_image(widths.url, auth, body)
    manifest = widths.manifests[name]
    reference = diffusers_img2img(
        widths.sources[name],
        gateway_sized(source, manifest),
        prompt=str(body["prompt"]),
        negative_prompt="blurry",
        strength=0.7,
        steps=8,
        guidance_scale=6.0,
        seed=2024,
        sdxl=manifest.family == "sdxl",
        latent_channels=manifest.latent_channels,
        vae_scale_factor=manifest.vae_scale_factor,
    )
    assert_parity(served, reference, name)
