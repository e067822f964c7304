"""S3Storage against a real S3 API (moto's server on loopback), and the Storage contract for both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from gateway.errors import StoreUnavailable, status_and_code
from gateway.media.storage import LocalStorage, S3Storage, Storage, make_storage, parse_s3_url
from gateway.settings import Settings
from tests.fixtures_s3 import S3Bucket, s3_bucket, s3_server  # noqa: F401 (pytest fixtures)
from tests.helpers import free_port
from tests.unit.test_storage_auth import BAD_NAMES

BASE = "http://gateway.test"
PREFIX = "imagen/images"
NAMES_AND_TYPES = [("img_abc_0.png", "image/png"), ("img_abc_input.jpg", "image/jpeg"), ("x.webp", "image/webp")]


async def _s3(bucket: S3Bucket) -> S3Storage:
    return S3Storage.from_url(bucket.url(PREFIX), base_url=BASE + "/")


@pytest.fixture
def bucket(s3_bucket: S3Bucket) -> S3Bucket:  # noqa: F811 (the fixture imported above)
    return s3_bucket


@pytest.fixture
async def s3(bucket: S3Bucket) -> AsyncIterator[S3Storage]:
    storage = await _s3(bucket)
    yield storage
    await storage.aclose()


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """The same contract, whichever backend."""
    if request.param == "local":
        yield LocalStorage(tmp_path / "images", base_url=BASE)
        return
    storage = await _s3(request.getfixturevalue("bucket"))
    yield storage
    await storage.aclose()


# --- the contract, both backends -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content_type"), NAMES_AND_TYPES)
async def test_put_then_get_round_trip(store: Storage, name: str, content_type: str) -> None:
    await store.put(name, b"\x89PNG data \x00\xff", content_type)
    assert await store.get(name) == (b"\x89PNG data \x00\xff", content_type)


async def test_overwrite_replaces(store: Storage) -> None:
    await store.put("a.jpg", b"one", "image/jpeg")
    await store.put("a.jpg", b"two", "image/jpeg")
    assert await store.get("a.jpg") == (b"two", "image/jpeg")


async def test_missing_object_is_none(store: Storage) -> None:
    assert await store.get("nothing.webp") is None


async def test_delete_then_get_is_none_and_deleting_twice_is_fine(store: Storage) -> None:
    await store.put("gone.png", b"x", "image/png")
    await store.delete("gone.png")
    assert await store.get("gone.png") is None
    await store.delete("gone.png")
    await store.delete("never-there.png")


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_names_are_refused(store: Storage, name: str) -> None:
    assert await store.get(name) is None
    with pytest.raises(ValueError, match="invalid storage name"):
        await store.put(name, b"x", "image/png")
    await store.delete(name)  # a no-op, never an error


async def test_content_type_must_match_extension(store: Storage) -> None:
    with pytest.raises(ValueError, match="does not match"):
        await store.put("a.png", b"x", "image/jpeg")
    assert await store.get("a.png") is None


async def test_urls_are_the_gateways_image_route(store: Storage) -> None:
    assert store.url_for("img_abc_0.png") == f"{BASE}/v1/images/img_abc_0.png"


async def test_large_objects_and_concurrent_calls(store: Storage) -> None:
    blobs = {f"img_{i}_0.png": bytes([i]) * (256 * 1024 + i) for i in range(24)}
    await asyncio.gather(*(store.put(name, data, "image/png") for name, data in blobs.items()))
    found = await asyncio.gather(*(store.get(name) for name in blobs))
    assert found == [(data, "image/png") for data in blobs.values()]


# --- S3 specifics ----------------------------------------------------------------------------------------


async def test_objects_land_under_the_prefix_with_their_content_type(s3: S3Storage, bucket: S3Bucket) -> None:
    for name, content_type in NAMES_AND_TYPES:
        await s3.put(name, name.encode(), content_type)
    assert bucket.object_keys() == sorted(f"{PREFIX}/{name}" for name, _ in NAMES_AND_TYPES)
    for name, content_type in NAMES_AND_TYPES:
        assert bucket.read(f"{PREFIX}/{name}") == (name.encode(), content_type)


async def test_objects_written_by_another_client_are_read(s3: S3Storage, bucket: S3Bucket) -> None:
    """Another replica's writes: the content type comes from the name, like LocalStorage."""
    bucket.endpoint.client().put_object(Bucket=bucket.name, Key=f"{PREFIX}/other.png", Body=b"theirs")
    assert await s3.get("other.png") == (b"theirs", "image/png")
    assert await s3.get("other.jpg") is None


async def test_no_prefix_means_the_bucket_root(bucket: S3Bucket) -> None:
    storage = S3Storage.from_url(bucket.url(), base_url=BASE)
    try:
        await storage.put("root.png", b"x", "image/png")
        assert bucket.object_keys() == ["root.png"]
    finally:
        await storage.aclose()


async def test_invalid_names_never_reach_the_bucket(s3: S3Storage, bucket: S3Bucket) -> None:
    bucket.endpoint.client().put_object(Bucket=bucket.name, Key="secret.png", Body=b"outside the prefix")
    for name in BAD_NAMES:
        with pytest.raises(ValueError):
            await s3.put(name, b"x", "image/png")
        assert await s3.get(name) is None
    assert await s3.get("../secret.png") is None
    assert bucket.object_keys() == ["secret.png"]


async def test_a_missing_bucket_is_unavailable_not_missing(bucket: S3Bucket) -> None:
    storage = S3Storage("no-such-bucket-here", base_url=BASE)
    try:
        for call in (storage.get("a.png"), storage.put("a.png", b"x", "image/png"), storage.delete("a.png")):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert isinstance(info.value.__cause__, ClientError)
            assert status_and_code(info.value) == (503, "store_unavailable")
            assert "no-such-bucket" not in (info.value.details or "")  # no internals on the wire
    finally:
        await storage.aclose()


async def test_an_unreachable_endpoint_is_unavailable(bucket: S3Bucket) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    storage = S3Storage(bucket.name, base_url=BASE, endpoint_url=dead, connect_timeout_s=1, max_attempts=1)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await storage.get("a.png")
        assert isinstance(info.value.__cause__, BotoCoreError)
        with pytest.raises(StoreUnavailable):
            await storage.put("a.png", b"x", "image/png")
    finally:
        await storage.aclose()


async def test_explicit_endpoint_wins_over_the_environment(bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    storage = S3Storage(bucket.name, base_url=BASE, endpoint_url=bucket.endpoint.url, max_attempts=1)
    try:
        await storage.put("a.png", b"x", "image/png")
        assert bucket.object_keys() == ["a.png"]
    finally:
        await storage.aclose()


async def test_region_and_bounds(bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    storage = S3Storage(bucket.name, base_url=BASE, max_connections=3, read_timeout_s=7)
    try:
        config = storage._client.meta.config
        assert storage._client.meta.region_name == "eu-west-3"
        assert config.max_pool_connections == 3 and storage._pool._max_workers == 3
        assert config.read_timeout == 7 and config.connect_timeout > 0
        assert config.s3["addressing_style"] == "path"  # a custom endpoint (AWS_ENDPOINT_URL) is set
    finally:
        await storage.aclose()
    with pytest.raises(ValueError):
        S3Storage(bucket.name, base_url=BASE, max_connections=0)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/a", ("my.bucket-1", "a/")),
        ("s3://bucket//a/b/", ("bucket", "a/b/")),
    ],
)
def test_parse_s3_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url", ["s3://", "s3://Bucket", "s3://b", "s3://key:secret@bucket", "s3://bucket/a?x=1", "s3://bucket/../a",
            "http://bucket/a"],
)  # fmt: skip
def test_parse_s3_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_url(url)


# --- settings and the factory ----------------------------------------------------------------------------


async def test_make_storage(tmp_path: Path, bucket: S3Bucket) -> None:
    base = Settings(storage_dir=tmp_path / "dir", public_base_url=BASE)
    local = make_storage(base)
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "dir"
    for url in (str(tmp_path / "other"), f"file://{tmp_path / 'other'}"):
        other = make_storage(Settings(storage_url=url, public_base_url=BASE))
        assert isinstance(other, LocalStorage) and other.root == tmp_path / "other"
    s3 = make_storage(Settings(storage_url=bucket.url("p/q"), public_base_url=BASE))
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == (bucket.name, "p/q/")
    assert s3.url_for("a.png") == f"{BASE}/v1/images/a.png"
    await s3.aclose()
    for bad in ("https://bucket/x", "file://elsewhere/x", "gs://bucket"):
        with pytest.raises(ValueError):
            make_storage(Settings(storage_url=bad))


async def test_settings_from_env(tmp_path: Path, bucket: S3Bucket) -> None:
    assert Settings.from_env({}).storage_url is None
    settings = Settings.from_env({"IMAGEN_STORAGE_URL": bucket.url("x"), "IMAGEN_S3_ENDPOINT_URL": bucket.endpoint.url})
    assert (settings.storage_url, settings.s3_endpoint_url) == (bucket.url("x"), bucket.endpoint.url)
    storage = make_storage(settings)
    try:
        await storage.put("a.png", b"x", "image/png")
        assert bucket.object_keys() == ["x/a.png"]
    finally:
        await storage.aclose()
    legacy = make_storage(Settings.from_env({"IMAGEN_STORAGE_DIR": str(tmp_path / "legacy")}))
    assert isinstance(legacy, LocalStorage) and legacy.root == tmp_path / "legacy"
