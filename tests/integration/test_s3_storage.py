"""Shared image storage on S3 (moto's server standing in for S3/MinIO): real gateway subprocesses, real Triton.

Images land in the bucket under the configured prefix, nothing on local disk, and are served through the
gateways' own `GET /v1/images/{name}` (the design in gateway/media/storage.py): any replica on the bucket
serves any image, and a job re-run after a crash reads its input back from the bucket.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.jobs.naming import StoredName, input_name, parse_name
from gateway.triton.server import TritonServer
from tests.fixtures_s3 import S3Bucket, s3_bucket, s3_server  # noqa: F401 (pytest fixtures)
from tests.helpers import SPEC_EXAMPLE, data_uri, make_image
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway, start_gateway

pytestmark = pytest.mark.integration

API_KEY = "s3-storage-key-0000-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PREFIX = "replicas/images"
FINAL = {"completed", "failed", "canceled"}


@pytest.fixture
def bucket(s3_bucket: S3Bucket) -> S3Bucket:  # noqa: F811 (the fixture imported above)
    return s3_bucket  # the fixture also points this process's AWS_* environment (inherited below) at moto


def start(
    triton: TritonServer, repository: Repository, folder: Path, bucket: S3Bucket, **env: str
) -> SubprocessGateway:
    settings = {
        "IMAGEN_STORAGE_URL": bucket.url(PREFIX),
        "IMAGEN_API_KEYS": API_KEY,
        "IMAGEN_RATE_LIMIT_PER_MINUTE": "0",
        "IMAGEN_LOG_LEVEL": "warning",
        **env,
    }
    return start_gateway(triton, repository, folder, **settings)


def fetch(url: str) -> httpx.Response:
    """An image as the job's key fetches it (inputs are served only to the key that created the job)."""
    response = httpx.get(url, headers=AUTH, timeout=30)
    assert response.status_code == 200, (url, response.status_code, response.text[:500])
    return response


def wait_final(gateway: SubprocessGateway, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{gateway.url}/v1/image-to-image/{job_id}", headers=AUTH, timeout=30).json()
        if job.get("status") in FINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('status')!r}: {job}\n{gateway.log_tail()}")


def test_two_replicas_share_images_through_the_bucket(
    triton: TritonServer, repository: Repository, tmp_path: Path, bucket: S3Bucket
) -> None:
    source = make_image(512, 384, seed=5, fmt="JPEG")
    body = {**SPEC_EXAMPLE, "image": data_uri(source, "image/jpeg"), "steps": 8}
    first = start(triton, repository, tmp_path / "gw1", bucket)
    try:
        response = httpx.post(f"{first.url}/v1/image-to-image", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200, f"{response.text}\n{first.log_tail()}"
        job = response.json()
        assert job["status"] == "completed" and len(job["images"]) == SPEC_EXAMPLE["num_images"]
        job_id = job["id"]
        stored_input = input_name(job_id, "jpg")
        outputs = [image["url"].rsplit("/", 1)[1] for image in job["images"]]
        assert all(parse_name(name) == StoredName(job_id, is_input=False) for name in outputs)

        # In the bucket, under the prefix: the input byte for byte, and the PNGs; nothing on local disk.
        assert bucket.object_keys() == sorted(f"{PREFIX}/{name}" for name in [stored_input, *outputs])
        assert bucket.read(f"{PREFIX}/{stored_input}") == (source, "image/jpeg")
        assert not (tmp_path / "gw1" / "images").exists()

        # Served by the gateway that made them, at its own URLs, with the bytes in the bucket.
        assert job["original_image"]["url"] == f"{first.url}/v1/images/{stored_input}"
        original = fetch(job["original_image"]["url"])
        assert original.headers["content-type"] == "image/jpeg" and original.content == source
        for image, name in zip(job["images"], outputs, strict=True):
            assert image["url"] == f"{first.url}/v1/images/{name}"
            served = fetch(image["url"])
            assert served.headers["content-type"] == "image/png" and "max-age" in served.headers["cache-control"]
            assert served.content == bucket.read(f"{PREFIX}/{name}")[0]
            assert served.content.startswith(b"\x89PNG\r\n\x1a\n")

        # A second replica (its own job store) on the same bucket serves the outputs the first wrote. The input is
        # served only to its job's key, which takes the job: a replica of another job store does not know it
        # (with a shared store it does: tests/integration/test_scale_out.py).
        second = start(triton, repository, tmp_path / "gw2", bucket)
        try:
            for name in outputs:
                assert fetch(f"{second.url}/v1/images/{name}").content == bucket.read(f"{PREFIX}/{name}")[0]
            assert httpx.get(f"{second.url}/v1/images/{stored_input}", headers=AUTH, timeout=30).status_code == 404
            missing = httpx.get(f"{second.url}/v1/images/{job_id}_9.png", timeout=30)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_job_re_run_after_a_crash_reads_its_input_from_the_bucket(
    triton: TritonServer, repository: Repository, tmp_path: Path, bucket: S3Bucket
) -> None:
    """Kill -9 with jobs queued: the restarted gateway has no decoded copy in memory, only the bucket's."""
    folder = tmp_path / "gw"
    gateway = start(triton, repository, folder, bucket, IMAGEN_MAX_RUNNING_JOBS="1")
    ids = []
    try:
        for seed in range(3):
            body = {"image": data_uri(make_image(96, 96, seed=seed, fmt="PNG"), "image/png"), "prompt": "a fox",
                    "steps": 30, "seed": seed}  # fmt: skip
            accepted = httpx.post(
                f"{gateway.url}/v1/image-to-image", json=body, headers={**AUTH, "Prefer": "respond-async"}, timeout=30
            )
            assert accepted.status_code == 202, accepted.text
            ids.append(accepted.json()["id"])
        last = httpx.get(f"{gateway.url}/v1/image-to-image/{ids[-1]}", headers=AUTH, timeout=30).json()
        assert last["status"] == "queued", f"test setup: the last job must still be queued at the crash: {last}"
        gateway.kill()
        assert f"{PREFIX}/{input_name(ids[-1], 'png')}" in bucket.object_keys()
    finally:
        gateway.stop()
    restarted = start(triton, repository, folder, bucket)  # same job store, same bucket, empty memory
    try:
        for job_id in ids:
            job = wait_final(restarted, job_id)
            assert job["status"] == "completed", f"{job}\n{restarted.log_tail()}"
            for image in job["images"]:
                assert image["url"].startswith(f"{restarted.url}/v1/images/")
                assert fetch(image["url"]).content == bucket.read(f"{PREFIX}/{image['url'].rsplit('/', 1)[1]}")[0]
    finally:
        restarted.stop()
