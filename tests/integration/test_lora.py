"""Issue 23: per-request LoRA adapters through the real gateway and the real Triton, against diffusers.

The session's tiny SD (`imagen-v2`) and SDXL (`imagen-xl`) are exported with LoRA slots (conftest.LORA_SLOTS: 4
slots of rank 8). Adapters are made here with PEFT on their diffusers folders (`tests/lora_files.py`), saved by
diffusers (its layout) and rewritten in kohya's, into the LoRA folder both the gateway and Triton's runners read
by default (`loras/` in the model repository). Each served image must match diffusers' `load_lora_weights` +
`set_adapters` on the same weights, seed and parameters within the parity tolerance (reference.py), as must rows
of requests with different adapters (and none) sharing UNet executions.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from export.lora import empty_lora_feeds_for
from export.onnx_export import export_component, load_pipeline
from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image, model_counts
from tests.integration.conftest import LORA_SLOTS, Repository
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image
from tests.lora_files import make_adapter, to_kohya

pytestmark = pytest.mark.integration

SD, XL = "imagen-v2", "imagen-xl"
SOURCE = make_image(128, 96, seed=3)
BASE: dict[str, Any] = {
    "prompt": "a lighthouse in a storm, ink drawing",
    "negative_prompt": "blurry",
    "strength": 0.8,
    "steps": 8,
    "guidance_scale": 6.0,
    "seed": 77,
}


@dataclass(frozen=True)
class Adapters:
    folder: Path
    files: dict[str, Path]


@pytest.fixture(scope="module")
def adapters(repository: Repository) -> Adapters:
    folder = repository.path.parent / "loras"  # the default of both the session's gateway and its Triton runners
    sd, xl = repository.diffusers_dirs[SD], repository.diffusers_dirs[XL]
    files = {
        # UNet and text encoder, rank 4 (below the bank's 8: padded), alpha 8 (scale 2 per layer).
        "ink": make_adapter(sd, folder / "ink.safetensors", seed=11, rank=4, alpha=8, text_encoders=True),
        # UNet only, at the bank's rank.
        "fox": make_adapter(sd, folder / "fox.safetensors", seed=12, rank=LORA_SLOTS.rank, alpha=4),
        "xl-ink": make_adapter(xl, folder / "xl-ink.safetensors", seed=13, rank=4, alpha=4, text_encoders=True),
    }
    files["ink-kohya"] = to_kohya(files["ink"], folder / "ink-kohya.safetensors", layers_per_block=1)
    files["xl-ink-kohya"] = to_kohya(
        files["xl-ink"], folder / "xl-ink-kohya.safetensors", layers_per_block=1, sgm=True, family="sdxl_base_v1-0"
    )
    return Adapters(folder, files)


@pytest.fixture(scope="module")
def references(repository: Repository, adapters: Adapters) -> dict[str, np.ndarray]:
    """diffusers' images of BASE on the SD model: no adapter, each adapter alone, two at once."""
    manifest = repository.manifests[SD]
    resized = gateway_sized(SOURCE, manifest)
    files = adapters.files

    def reference(model: str, loras: list[tuple[Path, float]]) -> np.ndarray:
        return diffusers_img2img(
            repository.diffusers_dirs[model],
            resized if model == SD else gateway_sized(SOURCE, repository.manifests[model]),
            **BASE,
            sdxl=model == XL,
            latent_channels=repository.manifests[model].latent_channels,
            vae_scale_factor=repository.manifests[model].vae_scale_factor,
            loras=loras,
        )

    return {
        "none": reference(SD, []),
        "ink": reference(SD, [(files["ink"], 0.8)]),
        "fox": reference(SD, [(files["fox"], 1.0)]),
        "ink+fox": reference(SD, [(files["ink"], 0.8), (files["fox"], -0.5)]),
        "xl-ink": reference(XL, [(files["xl-ink"], 0.7)]),
    }


def _body(model: str, loras: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": data_uri(SOURCE), "model": model, **BASE, "loras": loras}


@pytest.mark.parametrize("name", ["ink", "ink-kohya"])
def test_an_adapter_matches_diffusers_load_lora_weights(
    gateway: str, auth: dict[str, str], adapters: Adapters, references: dict[str, np.ndarray], name: str
) -> None:
    """UNet and text-encoder LoRA, in diffusers' layout and in kohya's (alpha per layer), at scale 0.8."""
    job, served = serve_first_image(gateway, auth, _body(SD, [{"name": name, "scale": 0.8}]))
    assert job["loras"] == [{"name": name, "scale": 0.8}]
    assert_parity(served, references["ink"], name)
    assert np.abs(references["ink"].astype(int) - references["none"].astype(int)).max() > 10  # it does something


def test_two_adapters_add_as_set_adapters_does(
    gateway: str, auth: dict[str, str], adapters: Adapters, references: dict[str, np.ndarray]
) -> None:
    """Two adapters of different ranks, one with a negative scale, in one request."""
    body = _body(SD, [{"name": "ink", "scale": 0.8}, {"name": "fox", "scale": -0.5}])
    _, served = serve_first_image(gateway, auth, body)
    assert_parity(served, references["ink+fox"], "ink+fox")


@pytest.mark.parametrize("name", ["xl-ink", "xl-ink-kohya"])
def test_an_sdxl_adapter_matches_diffusers(
    gateway: str, auth: dict[str, str], adapters: Adapters, references: dict[str, np.ndarray], name: str
) -> None:
    """SDXL: the UNet and both text encoders; the kohya copy under SDXL's original (SGM) UNet names."""
    _, served = serve_first_image(gateway, auth, _body(XL, [{"name": name, "scale": 0.7}]))
    assert_parity(served, references["xl-ink"], name)


def test_requests_with_different_adapters_share_unet_executions(
    gateway: str,
    auth: dict[str, str],
    triton: TritonServer,
    adapters: Adapters,
    references: dict[str, np.ndarray],
) -> None:
    """Concurrent requests with adapter ink, adapter fox and none: Triton ran fewer UNet executions than it got
    calls (their rows shared batches), and each image is its own reference's."""
    asks = {"ink": [{"name": "ink", "scale": 0.8}], "fox": [{"name": "fox", "scale": 1.0}], "none": []}
    before = model_counts(triton.grpc_url, f"{SD}_unet")

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{gateway}/v1/image-to-image", json=_body(SD, loras), headers=auth)
                    for loras in [*asks.values(), *asks.values()]
                )
            )

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses if r.status_code != 200]
    inferences, executions = (
        after - was for after, was in zip(model_counts(triton.grpc_url, f"{SD}_unet"), before, strict=True)
    )
    assert inferences >= 6 * int(BASE["steps"] * BASE["strength"]), inferences
    assert executions < inferences, (executions, inferences)
    for name, response in zip([*asks, *asks], responses, strict=True):
        image = Image.open(io.BytesIO(httpx.get(response.json()["images"][0]["url"]).content))
        pixels = np.asarray(image.convert("RGB"))
        assert_parity(pixels, references[name], f"{name} in a mixed batch")


def _post(gateway: str, auth: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=120)


@pytest.mark.parametrize(
    ("model", "loras", "message", "fragment"),
    [
        (SD, [{"name": "nobody"}], "Invalid field 'loras[0].name'", "Unknown LoRA adapter 'nobody'"),
        (SD, [{"name": "ink"}, {"name": "xl-ink"}], "Invalid field 'loras[1].name'", "made for SDXL"),
        (XL, [{"name": "fox"}], "Invalid field 'loras[0].name'", "not made for this model"),
        ("imagen-v3", [{"name": "ink"}], "Invalid field 'loras'", "exported without --lora-slots"),
        (SD, [{"name": f"a{i}"} for i in range(5)], "Invalid field 'loras'", "at most 4 distinct adapters"),
        (SD, [{"name": "ink", "scale": 9}], "Invalid field 'loras'", "between -4.0 and 4.0"),
    ],
    ids=["unknown", "wrong-family", "other-shapes", "no-slots", "too-many", "scale"],
)
def test_adapters_that_cannot_run_are_a_400_naming_the_field(
    gateway: str,
    auth: dict[str, str],
    adapters: Adapters,
    model: str,
    loras: list[dict[str, Any]],
    message: str,
    fragment: str,
) -> None:
    response = _post(gateway, auth, _body(model, loras))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["message"]) == ("invalid_request", message), error
    assert fragment in error["details"], error


def test_a_corrupt_file_fails_only_the_requests_naming_it(
    gateway: str, auth: dict[str, str], adapters: Adapters, references: dict[str, np.ndarray]
) -> None:
    data = adapters.files["ink"].read_bytes()
    (adapters.folder / "broken.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    (adapters.folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    try:
        for name in ("broken", "garbage"):
            response = _post(gateway, auth, _body(SD, [{"name": name}]))
            assert response.status_code == 400, response.text
            assert f"LoRA adapter '{name}' cannot be used" in response.json()["error"]["details"]
        _, served = serve_first_image(gateway, auth, _body(SD, [{"name": "ink", "scale": 0.8}]))
        assert_parity(served, references["ink"], "ink beside corrupt files")
        listed = httpx.get(f"{gateway}/v1/loras", headers=auth).json()["data"]
        assert {"broken", "garbage"}.isdisjoint(a["id"] for a in listed)
    finally:
        (adapters.folder / "broken.safetensors").unlink()
        (adapters.folder / "garbage.safetensors").unlink()


def test_the_listing_says_what_each_adapter_is_for(gateway: str, auth: dict[str, str], adapters: Adapters) -> None:
    response = httpx.get(f"{gateway}/v1/loras", headers=auth)
    assert response.status_code == 200, response.text
    listed = {a["id"]: a for a in response.json()["data"]}
    assert {"ink", "fox", "ink-kohya", "xl-ink", "xl-ink-kohya"} <= set(listed)
    ink = listed["ink"]
    assert (ink["rank"], ink["format"], ink["components"], ink["models"]) == (
        4,
        "diffusers",
        ["unet", "text_encoder"],
        [SD],
    )
    assert ink["size_bytes"] == adapters.files["ink"].stat().st_size
    assert listed["ink-kohya"]["format"] == "kohya"
    xl = listed["xl-ink-kohya"]
    assert (xl["family"], xl["components"], xl["models"]) == (
        "sdxl",
        ["unet", "text_encoder", "text_encoder_2"],
        [XL, "imagen-xl-turbo"],
    )
    only_xl = httpx.get(f"{gateway}/v1/loras", params={"model": XL}, headers=auth).json()["data"]
    assert {a["id"] for a in only_xl} == {a for a, info in listed.items() if XL in info["models"]}
    assert httpx.get(f"{gateway}/v1/loras", params={"model": "nope"}, headers=auth).status_code == 404
    models = {m["id"]: m for m in httpx.get(f"{gateway}/v1/models", headers=auth).json()["data"]}
    assert models[SD]["lora"] == {"slots": LORA_SLOTS.slots, "max_rank": LORA_SLOTS.rank, "max_per_request": 4}
    assert models["imagen-v3"]["lora"] is None


def test_the_adapters_are_part_of_the_idempotent_request(
    gateway: str, auth: dict[str, str], adapters: Adapters
) -> None:
    headers = {**auth, "Idempotency-Key": "lora-hash-1", "Prefer": "respond-async"}
    first = httpx.post(f"{gateway}/v1/image-to-image", json=_body(SD, [{"name": "ink"}]), headers=headers, timeout=60)
    assert first.status_code == 202, first.text
    other = httpx.post(f"{gateway}/v1/image-to-image", json=_body(SD, [{"name": "fox"}]), headers=headers, timeout=60)
    assert other.status_code == 409, other.text


def test_a_file_added_is_served_without_a_restart_and_a_full_bank_reloads_what_it_evicted(
    gateway: str,
    auth: dict[str, str],
    adapters: Adapters,
    references: dict[str, np.ndarray],
) -> None:
    """Files added while serving are served; then more adapters than the bank has slots, one after another: the
    first is evicted (the least recently used when the last loads), and asked again it is read back into a slot
    and gives its own image, not what the slot held (`test_the_bank_reuses_the_least_recently_used_slot` checks
    the bank's choice of slot itself)."""
    late = [f"late-{i}" for i in range(LORA_SLOTS.slots)]
    for name in late:  # copies of fox under new names: new files, as an operator adds them
        shutil.copy(adapters.files["fox"], adapters.folder / f"{name}.safetensors")
    try:
        _, first = serve_first_image(gateway, auth, _body(SD, [{"name": "ink", "scale": 0.8}]))
        for name in late:  # fills every slot after ink's: ink is the least recently used when the last loads
            _, served = serve_first_image(gateway, auth, _body(SD, [{"name": name, "scale": 1.0}]))
            assert_parity(served, references["fox"], name)
        _, again = serve_first_image(gateway, auth, _body(SD, [{"name": "ink", "scale": 0.8}]))
        assert_parity(again, references["ink"], "ink reloaded")
        assert_parity(first, references["ink"], "ink")
    finally:
        for name in late:
            (adapters.folder / f"{name}.safetensors").unlink()


def test_a_graph_with_slots_and_no_adapter_row_is_the_graph_without(repository: Repository, tmp_path: Path) -> None:
    """The same weights exported without branches and with them (the session's imagen-v2 UNet: slots 4, rank 8)
    give the same output when no row has an adapter. (The export's own check compares every slotted graph, text
    encoders included, with the torch module on no adapter row; the served no-adapter requests on imagen-v2 match
    diffusers in test_parity.)"""
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((3, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([5.0, 500.0, 990.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, 32)).astype(np.float32),
    }
    plain = export_component(load_pipeline(repository.diffusers_dirs[SD]), "unet", tmp_path)
    slotted = repository.path / f"{SD}_unet" / "1" / "model.onnx"
    outputs = []
    for path in (plain, slotted):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph = {i.name: list(i.shape) for i in session.get_inputs()}
        outputs.append(session.run(None, {**inputs, **empty_lora_feeds_for(graph)})[0])
    assert len(graph) > len(inputs)  # the slotted graph does take the bank
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5, rtol=0)


def _runner_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_bank_reuses_the_least_recently_used_slot(repository: Repository, adapters: Adapters) -> None:
    """The runner's bank (lora_bank.py as installed beside the served UNet) over that graph's bank shapes, with
    two slots: a third adapter takes the least recently used one's slot; that one, asked again, is loaded back
    with its own weights; a file replaced under its name is reloaded in place."""
    folder = repository.path / f"{SD}_unet" / "1"
    formats = _runner_module(folder / "lora_format.py", "imagen_lora_format")
    bank_module = _runner_module(folder / "lora_bank.py", "imagen_lora_bank")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in graph.input
        if i.name.startswith("lora.")
    }
    loads: list[str] = []
    bank = bank_module.LoraBank(
        formats, "unet", shapes, slots=2, folder=adapters.folder, layers_per_block=1, base="sd", log=loads.append
    )

    def weights(name: str) -> np.ndarray:
        slot = bank.held[name][1]
        return np.concatenate([bank.up[layer][slot].ravel() for layer in sorted(bank.up)])

    bank.feeds([(("ink", 1.0),)])
    ink = weights("ink")
    bank.feeds([(("fox", 1.0),)])
    bank.feeds([(("ink", 0.5),)])  # ink is now the most recently used
    feeds = bank.feeds([(("ink-kohya", 1.0),), ()])  # evicts fox, not ink
    assert set(bank.held) == {"ink", "ink-kohya"} and "evicting 'fox'" in loads[-1], loads
    assert feeds["lora_rows"].tolist() == [0] and feeds["lora_slots"].shape == (1, 1)
    np.testing.assert_allclose(weights("ink-kohya"), ink, rtol=1e-6)  # kohya's copy: the same scaled weights
    bank.feeds([(("fox", 1.0),)])  # evicts ink
    assert "evicting 'ink'" in loads[-1], loads
    bank.feeds([(("ink", 1.0), ("fox", 0.5))])  # ink back, beside fox (pinned: not its victim)
    assert set(bank.held) == {"ink", "fox"}
    np.testing.assert_array_equal(weights("ink"), ink)
    assert len(loads) == 5, loads  # ink, fox, ink-kohya, fox, ink: a held adapter's use loaded nothing
    swap = adapters.folder / "swap.safetensors"
    try:
        shutil.copy(adapters.files["fox"], swap)
        bank.feeds([(("swap", 1.0),)])
        slot = bank.held["swap"][1]
        shutil.copy(adapters.files["ink"], swap)  # replaced under the same name: reloaded in place
        os.utime(swap, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        bank.feeds([(("swap", 1.0),)])
        assert bank.held["swap"][1] == slot
        np.testing.assert_array_equal(weights("swap"), ink)
    finally:
        swap.unlink()


def test_the_openai_route_takes_the_adapters_as_json_text(
    gateway: str, auth: dict[str, str], adapters: Adapters, references: dict[str, np.ndarray]
) -> None:
    """OpenAI's edit form carries `loras` as one text field of JSON; the image is the native route's."""
    fields = {
        "prompt": BASE["prompt"],
        "negative_prompt": BASE["negative_prompt"],
        "model": SD,
        "strength": str(BASE["strength"]),
        "steps": str(BASE["steps"]),
        "guidance_scale": str(BASE["guidance_scale"]),
        "seed": str(BASE["seed"]),
        "response_format": "b64_json",
    }
    files = {"image": ("in.png", SOURCE, "image/png")}
    url = f"{gateway}/v1/images/edits"
    ok = httpx.post(url, data={**fields, "loras": '[{"name": "ink", "scale": 0.8}]'}, files=files, headers=auth)
    assert ok.status_code == 200, ok.text
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert_parity(served, references["ink"], "ink through the OpenAI route")
    for loras, param in (("[{", "loras"), ('[{"name": "nobody"}]', "loras[0].name")):
        bad = httpx.post(url, data={**fields, "loras": loras}, files=files, headers=auth)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param, bad.json()
