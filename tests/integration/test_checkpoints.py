"""Issue 20, items 1, 3 and 5: real widths and single-file checkpoints, end to end, at a cost CI can pay.

`export.tiny` size `widths` has SD 1.5's 768-wide text encoder and cross-attention, and SDXL's 768- and
1280-wide text encoders (cross-attention 2048 = 768 + 1280, the added embedding 2816 = 6 x 256 + 1280, a
1280-wide pooled projection), with attention heads of 64, but one UNet layer per block, two text layers and a
128 px native size. Unlike the tiny models, whose SDXL encoders are equally wide, any mix-up of two of these
dimensions fails here (diffusers' single-file loader itself tells SDXL's two encoders apart by their widths).

Single files in the original layout are written from random pipelines (export.checkpoint.write_checkpoint):
SD 1.x, SD 2.x with v-prediction (an OpenCLIP-layout text encoder) and SDXL at real widths. Each reads back into
exactly the weights it was written from, and exports as `python -m export --checkpoint` does (the CLI itself runs
in the pickle and bad-file tests).

The folders are exported with the export's own check on (the single files' weights are those folders'), everything
is served by a Triton of this module's own (SDXL in both runtimes) and the real gateway, and compared with
diffusers; a single file's images also with its folder's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from export.checkpoint import checkpoint_family, load_checkpoint, write_checkpoint
from export.onnx_export import load_pipeline
from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions
from export.tiny import build_random_pipeline
from gateway.diffusion.manifest import PipelineManifest, load_manifests
from gateway.settings import PROJECT_ROOT
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, start_own_triton
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image

pytestmark = pytest.mark.integration

# name -> (arch, size, seed, scheduler, runtime, exported from a single file)
PIPELINES = {
    "widths-sd": ("sd", "widths", 3, "pndm", "onnxruntime", False),
    "widths-xl": ("sdxl", "widths", 4, "euler", "onnxruntime", False),
    "widths-xl-torch": ("sdxl", "widths", 4, "euler", "torch", False),
    "file-xl": ("sdxl", "widths", 4, "euler", "onnxruntime", True),
    "file-sd": ("sd", "tiny", 5, "pndm", "onnxruntime", True),
    "file-sd2-v": ("sd2", "tiny", 6, "ddim", "onnxruntime", True),
}
FAMILIES = {"sd": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


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
    for name, (arch, size, seed, scheduler, runtime, single_file) in PIPELINES.items():
        folder = root / f"diffusers-{arch}-{size}-{seed}"
        if not folder.exists():  # the SDXL weights are exported three times: two runtimes, a folder and a file
            build_random_pipeline(folder, size=size, seed=seed, scheduler=scheduler, arch=arch)
        sources[name] = folder
        if single_file:
            # In process, as `python -m export --checkpoint FILE --config DIR` runs it (the CLI itself is run by the
            # pickle and bad-file tests below). The export's own check is off: the file reads back into its
            # folder's weights (tested below), and what it serves is compared with diffusers.
            checkpoint = write_checkpoint(load_pipeline(folder), FAMILIES[arch], root / f"{name}.safetensors")
            request = ExportRequest(
                model_dir=None, repository=repo, name=name, checkpoint=checkpoint, checkpoint_config=folder,
                validate=False,
            )  # fmt: skip
            run_export(request, progress=False)
            continue
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
def test_each_pipeline_serves_what_diffusers_makes(widths: Served, auth: dict[str, str], name: str) -> None:
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
    if name == "file-xl":  # and what the same weights exported from their folder serve
        _, from_folder = serve_first_image(widths.url, auth, {**body, "model": "widths-xl"})
        assert_parity(served, from_folder, "file-xl vs widths-xl")


@pytest.mark.parametrize("arch", ["sd", "sd2", "sdxl"])
def test_a_single_file_reads_back_into_the_weights_it_was_written_from(
    widths: Served, tmp_path: Path, arch: str
) -> None:
    name = {"sd": "file-sd", "sd2": "file-sd2-v", "sdxl": "file-xl"}[arch]
    folder = widths.sources[name]
    original = load_pipeline(folder)
    checkpoint = write_checkpoint(original, FAMILIES[arch], tmp_path / "model.safetensors")
    assert checkpoint_family(checkpoint, allow_pickle=False) == FAMILIES[arch]
    loaded = load_checkpoint(checkpoint, FAMILIES[arch], folder)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, component, None) is None:
            continue
        want, got = getattr(original, component).state_dict(), getattr(loaded, component).state_dict()
        assert want.keys() == got.keys(), component
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert not unequal, (component, unequal[:5])


def _export(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *argv], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SD 1.x folder and its single file."""
    root = tmp_path_factory.mktemp("tiny-file")
    folder = build_random_pipeline(root / "diffusers", size="tiny", seed=8, scheduler="pndm")
    return folder, write_checkpoint(load_pipeline(folder), "sd1", root / "model.safetensors")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not a model", "is not an SD 1.x, 2.x or SDXL checkpoint"),
        ("another architecture", "is not an SD 1.x, 2.x or SDXL checkpoint"),
        ("truncated", "not a complete .safetensors file"),
        ("a pickle without the flag", "is a pickle, and loading a pickle can run code"),
        # Without --config, the published SD 1.5 configs: a tiny model's weights do not fit them.
        ("other sizes than its configs", "cannot load"),
        # --arch names the family instead of the keys: an SD 1.x file read as SDXL lacks SDXL's weights.
        ("another family than --arch", "cannot load"),
    ],
)
def test_bad_checkpoints_get_one_line_and_exit_2(
    tiny_sd: tuple[Path, Path], tmp_path: Path, case: str, expected: str
) -> None:
    from safetensors.torch import save_file

    folder, good = tiny_sd
    path = tmp_path / "model.safetensors"
    config = ["--config", str(folder)]
    if case == "not a model":
        save_file({"weights": torch.zeros(4)}, str(path))
    elif case == "another architecture":  # an SD3-style file: its CLIP under text_encoders.*, an MMDiT
        save_file(
            {
                "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(24, 8),
            },
            str(path),
        )
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "a pickle without the flag":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {}}, path)
    elif case == "another family than --arch":
        path, config = good, ["--arch", "sdxl"]
    else:
        path, config = good, []
    result = _export("--checkpoint", str(path), *config, "--output", str(tmp_path / "repo"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("export: error: ") and expected in result.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_pickle_checkpoint_exports_with_the_flag(tiny_sd: tuple[Path, Path], tmp_path: Path) -> None:
    """A .ckpt (a pickled {"state_dict": ...}, as the original training code saved them) with --allow-pickle;
    it is still read with torch's restricted unpickler (weights only). Its family given with --arch."""
    folder, good = tiny_sd
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(good))}, ckpt)
    repo = tmp_path / "repo"
    argv = ["--checkpoint", str(ckpt), "--config", str(folder), "--allow-pickle", "--arch", "sd"]  # --arch: as found
    result = _export(*argv, "--output", str(repo))
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((repo / "imagen-v2.pipeline.json").read_text())
    assert manifest["source"] == str(ckpt) and manifest["family"] == "sd"


@pytest.mark.parametrize("arch", ["sd"])  # SDXL's conv_in has the same key and shape rule
def test_an_inpainting_file_reads_back_with_an_ordinary_config(tmp_path: Path, arch: str) -> None:
    """An inpainting single file (9-channel conv_in, as sd-v1-5-inpainting and SDXL inpainting 0.1 are shipped)
    read with the configs of the ordinary model of its family: the UNet is widened to the file's, and every weight
    is the file's own (so the export then finds an inpainting model, `unet_in_channels: 9`)."""
    folder = build_random_pipeline(tmp_path / "inpaint", size="tiny", seed=9, arch=arch, inpainting=True)
    ordinary = build_random_pipeline(tmp_path / "plain", size="tiny", seed=9, arch=arch)
    original = load_pipeline(folder)
    checkpoint = write_checkpoint(original, FAMILIES[arch], tmp_path / "inpaint.safetensors")
    loaded = load_checkpoint(checkpoint, FAMILIES[arch], ordinary)
    assert loaded.unet.config.in_channels == 9 and loaded.unet.config.out_channels == 4
    want, got = original.unet.state_dict(), loaded.unet.state_dict()
    assert want.keys() == got.keys()
    assert not [k for k in want if not torch.equal(want[k], got[k])]
    assert json.loads((ordinary / "unet" / "config.json").read_text())["in_channels"] == 4  # the user's folder
