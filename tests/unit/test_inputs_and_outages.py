"""Issue 22, points 1 and 7: just-accepted inputs are kept bounded in bytes and resized (not as decoded
originals), every 503 carries `Retry-After`, and a storage outage during a run is waited out within a bound
instead of failing the job."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import ERROR_TABLE, ApiError, StoreUnavailable
from gateway.http.openai_compat import openai_error_response
from gateway.http.responses import error_response, raw_error_response, stored_error_response
from gateway.jobs.admission import Admission
from gateway.jobs.execute import DecodedInputs, JobExecutor
from gateway.jobs.request import parse_image_to_image
from tests.helpers import make_image
from tests.unit.fakes import FakeTriton, MemoryStorage, make_job, make_spec, tiny_manifest

RGB_100 = 100 * 100 * 3


def _rgb(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (10, 20, 30))


def test_the_input_cache_is_bounded_in_bytes_oldest_out_first() -> None:
    cache = DecodedInputs(max_bytes=2 * RGB_100 + 10)
    for job in ("a", "b", "c"):
        cache.put(job, _rgb(100))
    assert cache.bytes == 2 * RGB_100 and len(cache) == 2
    assert cache.take("a") is None and cache.take("b") is not None
    cache.put("huge", _rgb(200))  # larger than the whole budget: not kept (the job reads its stored input)
    assert cache.take("huge") is None
    cache.drop("c")  # another replica ran it
    assert cache.bytes == 0 and len(cache) == 0


async def _noop_charge(cost: int) -> None:
    return None


async def test_admission_keeps_the_resized_input_not_the_decoded_original(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path)
    pipeline = Img2ImgPipeline(manifest, cast(Any, FakeTriton(manifest)))
    admission = Admission(
        pipelines={manifest.name: pipeline}, http=cast(Any, None), policy=cast(Any, None), fetch_timeout_s=1.0
    )
    original = make_image(2048, 1536, fmt="JPEG")
    request = parse_image_to_image({"image": original, "prompt": "a cat", "model": manifest.name}, styles=STYLE_PRESETS)
    admitted = await admission.admit(request, asynchronous=True, charge=_noop_charge)
    size = admitted.spec.processed_size
    assert (admitted.input_size.width, admitted.input_size.height) == (2048, 1536)
    assert admitted.model_input.size == (size.width, size.height) and admitted.model_input.mode == "RGB"
    assert size.width * size.height * 3 < 2048 * 1536 * 3 // 100  # the cached entry, against the original's


async def test_a_cached_resized_input_gives_the_same_images_as_the_stored_original(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path)
    pipeline = Img2ImgPipeline(manifest, cast(Any, FakeTriton(manifest)))
    storage, cache = MemoryStorage(), DecodedInputs()
    executor = JobExecutor({manifest.name: pipeline}, cast(Any, storage), cache)
    job = make_job("a", spec=make_spec(steps=4, strength=0.5, effective_steps=2))
    original = make_image(40, 36)
    await storage.put(job.input.name, original, "image/png")
    from_storage = await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    stored_bytes = storage.objects[from_storage[0].name][0]
    size = (job.spec.processed_size.width, job.spec.processed_size.height)
    resized = Image.open(io.BytesIO(original)).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    cache.put("a", resized)
    from_cache = await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    assert cache.bytes == 0 and storage.objects[from_cache[0].name][0] == stored_bytes


class FlakyStorage(MemoryStorage):
    """Puts fail with `StoreUnavailable` (a bucket down) `failures` times, then succeed."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        if self.failures > 0 and not name.endswith(("_input.png", "_input.jpg")):
            self.failures -= 1
            raise StoreUnavailable("Storage unavailable", "bucket down")
        await super().put(name, data, content_type)


def _flaky_executor(tmp_path: Path, failures: int, outage_s: float) -> tuple[FlakyStorage, JobExecutor]:
    manifest = tiny_manifest(tmp_path)
    pipeline = Img2ImgPipeline(manifest, cast(Any, FakeTriton(manifest)))
    storage = FlakyStorage(failures)
    executor = JobExecutor(
        {manifest.name: pipeline},
        cast(Any, storage),
        DecodedInputs(),
        storage_outage_s=outage_s,
        storage_retry_max_s=0.05,
    )
    return storage, executor


async def test_a_storage_outage_during_a_run_is_waited_out(tmp_path: Path) -> None:
    storage, executor = _flaky_executor(tmp_path, failures=5, outage_s=10.0)
    job = make_job("a")
    await storage.put(job.input.name, make_image(20, 18), "image/png")
    images = await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    assert storage.failures == 0 and images[0].name in storage.objects


async def test_a_storage_outage_past_the_bound_fails_the_job_in_bounded_time(tmp_path: Path) -> None:
    storage, executor = _flaky_executor(tmp_path, failures=10**6, outage_s=0.3)
    job = make_job("a")
    await storage.put(job.input.name, make_image(20, 18), "image/png")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    assert time.monotonic() - started < 2.0


UNAVAILABLE = [cls for cls, (status, _) in ERROR_TABLE.items() if status == 503]


@pytest.mark.parametrize("cls", UNAVAILABLE, ids=lambda cls: cls.__name__)
def test_every_503_carries_retry_after_in_every_dialect(cls: type[ApiError]) -> None:
    exc = cls("Unavailable", "down")
    assert error_response(exc).headers["Retry-After"].isdigit()
    assert openai_error_response(exc).headers["Retry-After"].isdigit()
    assert b"\r\nretry-after: " in raw_error_response(exc)
    _, code = ERROR_TABLE[cls]
    assert stored_error_response(code, "Unavailable", None, {}).headers["Retry-After"].isdigit()
    with_own = cls("Unavailable", "down", headers={"Retry-After": "9"})
    assert error_response(with_own).headers["Retry-After"] == "9"  # an error's own value wins


def test_a_kept_input_is_dropped_when_another_replica_runs_or_ends_the_job() -> None:
    """Issue 22, point 1: with a shared store, a replica kept entries for jobs other replicas ran, for good."""
    from gateway.jobs.events import EventKind, JobEvent
    from gateway.jobs.runner import JobManager
    from tests.unit.fakes import InMemoryJobStore
    from tests.unit.test_job_runner import small_settings

    cache = DecodedInputs()
    for job in ("ran-elsewhere", "ended", "queued"):
        cache.put(job, _rgb(10))
    manager = JobManager(
        InMemoryJobStore(),
        cast(Any, None),
        cast(Any, MemoryStorage()),
        small_settings(),
        poster=cast(Any, None),
        render=cast(Any, None),
        run_elsewhere=cache.drop,
    )
    manager.workers.on_bus_event(JobEvent("ran-elsewhere", EventKind.PROGRESS, 0, 4))
    manager.workers.on_bus_event(JobEvent("ended", EventKind.FINAL))
    manager.workers.on_bus_event(JobEvent("queued", EventKind.CREATED))
    assert len(cache) == 1 and cache.take("queued") is not None


async def test_a_masked_run_keeps_the_input_outside_the_mask_cached_or_read_back(tmp_path: Path) -> None:
    import dataclasses

    import numpy as np

    from gateway.jobs.model import InputImage
    from gateway.media import codecs

    manifest = tiny_manifest(tmp_path)
    pipeline = Img2ImgPipeline(manifest, cast(Any, FakeTriton(manifest)))
    storage, cache = MemoryStorage(), DecodedInputs()
    executor = JobExecutor({manifest.name: pipeline}, cast(Any, storage), cache)
    spec = make_spec(steps=4, strength=0.5, effective_steps=2, masked=True, mask_blur=0)
    size = (spec.processed_size.width, spec.processed_size.height)
    grey = np.zeros((size[1], size[0]), np.uint8)
    grey[:, size[0] // 2 :] = 255  # change the right half
    out = io.BytesIO()
    Image.fromarray(grey, "L").save(out, format="PNG")
    job = dataclasses.replace(
        make_job("a", spec=spec), mask=InputImage(url="u", name="a_mask.png", width=size[0], height=size[1])
    )
    original = make_image(*size)
    await storage.put(job.input.name, original, "image/png")
    await storage.put("a_mask.png", out.getvalue(), "image/png")
    read_back = await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    model_input = codecs.resize_for_model(codecs.decode_image(original), size)
    cache.put(job.id, model_input, codecs.prepare_mask(codecs.decode_mask(out.getvalue()), size, 0))
    cached = await executor(job, on_step=lambda d, t: None, should_stop=lambda: False)
    first, second = (storage.objects[images[0].name][0] for images in (read_back, cached))
    assert first == second
    pixels = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    np.testing.assert_array_equal(pixels[:, : size[0] // 2], np.asarray(model_input)[:, : size[0] // 2])
