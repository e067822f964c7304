"""Real sizes, on demand (`IMAGEN_SLOW_TESTS=1 .venv/bin/python -m pytest tests/integration/test_real_size.py`):
an SD 1.5-sized random pipeline (the published configs, 512 px) held as a single file, as users hold theirs,
exported with the shipped configs (no --config) and the export's check on, served at 512 px by the real Triton
and gateway, and compared with diffusers on the same weights within the parity tolerance. The export's summary
line gives its peak RSS, printed here (`-s`) for the record. 2026-12-07, 2 cores: passed in 6 min 50 s; the
export peaked at 11.64 GB (3.4x the UNet's 3.44 GB of fp32 weights: diffusers' single-file loading holds the
file's tensors beside the converted modules; from a folder the same export peaks at 8.95 GB). Issue 20 asks for
2x; not reached yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from export.checkpoint import write_checkpoint
from export.onnx_export import load_pipeline
from export.tiny import build_random_pipeline
from gateway.diffusion.manifest import load_manifests
from gateway.settings import PROJECT_ROOT
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, start_own_triton
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sd15_single_file_exports_with_shipped_configs_and_serves_like_diffusers(
    tmp_path: Path, make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    folder = build_random_pipeline(tmp_path / "sd15", size="sd15", seed=0, scheduler="pndm")
    checkpoint = write_checkpoint(load_pipeline(folder), "sd1", tmp_path / "sd15.safetensors")
    repo = tmp_path / "models"
    argv = ["--checkpoint", str(checkpoint), "--name", "sd15", "--output", str(repo), "--max-batch-size", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "export", *argv], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout.strip())
    manifest = load_manifests(repo)["sd15"]
    assert manifest.native_resolution == 512
    server = start_own_triton(repo, tmp_path / "tritonserver.log")
    try:
        server.wait_ready(manifest.models, timeout_s=600)
        with make_gateway(model_repository=repo, triton_url=server.grpc_url) as url:
            source = make_image(512, 512, seed=3, fmt="PNG")
            body = {"image": data_uri(source), "prompt": "a lighthouse", "model": "sd15", "strength": 0.5}
            body |= {"steps": 4, "guidance_scale": 7.5, "seed": 11}
            _, served = serve_first_image(url, auth, body)
    finally:
        server.stop()
    reference = diffusers_img2img(
        folder,
        gateway_sized(source, manifest),
        prompt="a lighthouse",
        negative_prompt=None,
        strength=0.5,
        steps=4,
        guidance_scale=7.5,
        seed=11,
        latent_channels=manifest.latent_channels,
        vae_scale_factor=manifest.vae_scale_factor,
    )
    assert_parity(served, reference, "sd15 single file")
