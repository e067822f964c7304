"""Where generated (and copied input) images live; served back at `GET /v1/images/{name}`.

`Storage` is the blob store's contract. `LocalStorage` keeps files in one folder (one gateway, or replicas
sharing a volume); `S3Storage` keeps objects under a prefix of a bucket on any S3-compatible store (AWS S3,
MinIO, Ceph, R2...), so stateless replicas share them. `make_storage(settings)` picks one from
`IMAGEN_STORAGE_URL`. Names are checked against a strict pattern so a client-supplied name can never leave
the folder or the prefix.

Serving: every image URL is the gateway's own `GET /v1/images/{name}`, whatever the backend; S3 objects are
read back by whichever replica gets the request. Not presigned URLs, because:
- a job's image URLs are rendered once, when it is created or finishes, and stored in the job record and sent
  in webhooks: a presigned URL would go stale inside a stored job (SigV4 caps expiry at 7 days, below a
  longer retention) and would break when credentials rotate (an STS/IRSA role's URL dies with its session);
- the bucket's endpoint is often private (MinIO inside the cluster) and is not part of our API: URLs stay
  `IMAGEN_PUBLIC_BASE_URL/v1/images/<name>`, the same for every backend and every replica;
- caching and any future auth on images stay in our hands (names are unique per job, so they are served
  `immutable` for a year and a CDN in front of the gateway absorbs repeated reads);
- the bytes are small (PNGs of at most the model's native resolution, inputs under the body cap).
A deployment that must offload bytes can put a CDN in front of `/v1/images/`.

S3 calls run on boto3 in a bounded thread pool (as many threads as HTTP connections in botocore's pool),
with connect/read timeouts and botocore's standard retries; every botocore error becomes `StoreUnavailable`
(503 `store_unavailable`, the cause chained) here, and a missing object is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread
import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from gateway.errors import StoreUnavailable

if TYPE_CHECKING:
    from gateway.settings import Settings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(png|jpg|webp)$")
CONTENT_TYPES: Mapping[str, str] = MappingProxyType({"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"})
FILE_MODE = 0o644  # mkstemp creates 0600; stored images may be served by another process (nginx, a CDN agent)
SERVED_AT = "/v1/images/"  # the gateway's route for stored objects
_TEMP_PREFIX = ".tmp-"  # a leading dot never matches NAME_PATTERN, so partial files are never served

# S3: bucket names as S3 allows them (3-63 characters, lowercase, digits, dots, hyphens).
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
S3_MAX_CONNECTIONS = 16  # botocore's HTTP pool, and the threads that use it
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3  # botocore "standard" retries (throttling, 5xx, connection errors), first try included
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_T = TypeVar("_T")


class Storage(Protocol):
    """Blob store keyed by file name; the name's extension carries the content type."""

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store `data` under `name`, replacing any previous object atomically."""
        ...

    async def get(self, name: str) -> tuple[bytes, str] | None:
        """Return (data, content type), or None when there is no such object."""
        ...

    async def delete(self, name: str) -> None:
        """Remove an object if it exists (retention clean-up)."""
        ...

    def url_for(self, name: str) -> str:
        """The absolute URL a client fetches the object from."""
        ...


def content_type_for(name: str) -> str | None:
    """Content type of a valid object name, or None when `name` is not a valid object name."""
    match = NAME_PATTERN.fullmatch(name)
    return CONTENT_TYPES[match.group(1)] if match else None


def check_put(name: str, content_type: str) -> None:
    """A bad name, or a content type the extension disagrees with, is a bug of the caller: ValueError."""
    expected = content_type_for(name)
    if expected is None:
        raise ValueError(f"invalid storage name {name!r}")
    if content_type != expected:
        raise ValueError(f"content type {content_type!r} does not match {name!r} ({expected})")


def served_url(base_url: str, name: str) -> str:
    """The gateway's own URL for a stored object (`GET /v1/images/{name}`)."""
    return f"{base_url.rstrip('/')}{SERVED_AT}{name}"


class LocalStorage:
    """Files in one folder, written atomically (temp file + fsync + os.replace), I/O off the event loop."""

    def __init__(self, root: Path, *, base_url: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")

    def url_for(self, name: str) -> str:
        """Local files are served by the gateway itself (`GET /v1/images/{name}`)."""
        return served_url(self.base_url, name)

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store `data`; a bad name, or a content type the extension disagrees with, is a bug: ValueError."""
        check_put(name, content_type)
        await anyio.to_thread.run_sync(self._write, name, data)

    async def get(self, name: str) -> tuple[bytes, str] | None:
        """Client-supplied names that are not valid simply do not exist (None), like missing ones."""
        content_type = content_type_for(name)
        if content_type is None:
            return None
        data = await anyio.to_thread.run_sync(self._read, name)
        return None if data is None else (data, content_type)

    async def delete(self, name: str) -> None:
        if content_type_for(name) is not None:
            await anyio.to_thread.run_sync(self._unlink, name)

    async def aclose(self) -> None:
        """Nothing to release (same shape as `S3Storage.aclose`)."""

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def _write(self, name: str, data: bytes) -> None:
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.root)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), FILE_MODE)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.root / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); `s3://bucket` -> ("bucket", "")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    if not BUCKET_PATTERN.fullmatch(parts.netloc):
        raise ValueError(f"invalid S3 bucket name {parts.netloc!r} in {url!r}")
    prefix = "/".join(segment for segment in parts.path.split("/") if segment)
    if any(segment in (".", "..") for segment in prefix.split("/")):
        raise ValueError(f"invalid S3 prefix in {url!r}")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Storage:
    """Objects `<prefix><name>` in one bucket of an S3-compatible store, through the gateway's URLs.

    Endpoint, region and credentials come from boto3's usual sources (`AWS_ENDPOINT_URL[_S3]`,
    `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE`, the
    shared config files, instance/pod roles); `endpoint_url` and `region` given here win, and `AWS_REGION` is
    honoured too (boto3 itself reads only `AWS_DEFAULT_REGION`). With any custom endpoint, buckets are
    addressed path-style (MinIO and most S3-compatible stores need it); payload checksums are only sent when
    an operation requires them, since botocore's default CRC32 trailers are refused by some of those stores.
    A single PUT is atomic in S3: readers see the old or the new object, never part of one.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        base_url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_connections: int = S3_MAX_CONNECTIONS,
        connect_timeout_s: float = S3_CONNECT_TIMEOUT_S,
        read_timeout_s: float = S3_READ_TIMEOUT_S,
        max_attempts: int = S3_MAX_ATTEMPTS,
    ) -> None:
        env = os.environ
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.bucket = bucket
        self.prefix = prefix
        self.base_url = base_url.rstrip("/")
        custom_endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {}
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in env:
            options["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in env:
            options["response_checksum_validation"] = "when_required"
        config = Config(
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
            **options,
        )
        session = boto3.session.Session(region_name=region or env.get("AWS_REGION") or None)
        self._client: Any = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        self._pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="s3-storage")

    @classmethod
    def from_url(cls, url: str, *, base_url: str, **options: Any) -> S3Storage:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, base_url=base_url, **options)

    def key_for(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def url_for(self, name: str) -> str:
        """Served by the gateway (`GET /v1/images/{name}` reads the object back): see the module docstring."""
        return served_url(self.base_url, name)

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store `data` (ValueError on a bad name or mismatched content type, like `LocalStorage`)."""
        check_put(name, content_type)
        key = self.key_for(name)
        await self._call(
            "put", self._client.put_object, Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
        )

    async def get(self, name: str) -> tuple[bytes, str] | None:
        """Invalid and missing names are None; the content type is the name's (as for `LocalStorage`)."""
        content_type = content_type_for(name)
        if content_type is None:
            return None
        data = await self._call("get", self._read, self.key_for(name))
        return None if data is None else (data, content_type)

    async def delete(self, name: str) -> None:
        """Deleting a missing object is not an error (S3 answers 204 either way)."""
        if content_type_for(name) is not None:
            await self._call("delete", self._client.delete_object, Bucket=self.bucket, Key=self.key_for(name))

    async def aclose(self) -> None:
        """Stop the thread pool (running calls finish) and close botocore's connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.close)

    def _read(self, key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise
        body = response["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    async def _call(self, what: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one blocking boto3 call on the pool; botocore's errors become ours here and only here."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: function(*args, **kwargs))
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(
                "The image storage is unavailable", f"Storage {what} failed; retry the request later"
            ) from exc


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
    return str(error.get("Code", ""))


def make_storage(settings: Settings) -> LocalStorage | S3Storage:
    """`IMAGEN_STORAGE_URL` unset: `IMAGEN_STORAGE_DIR`; a folder path or `file://` URL: that folder;
    `s3://bucket/prefix`: S3 (endpoint `IMAGEN_S3_ENDPOINT_URL`, else boto3's own settings)."""
    url = settings.storage_url
    if url is None:
        return LocalStorage(settings.storage_dir, base_url=settings.base_url)
    if "://" not in url:
        return LocalStorage(Path(url), base_url=settings.base_url)
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Storage.from_url(url, base_url=settings.base_url, endpoint_url=settings.s3_endpoint_url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and not parts.query and not parts.fragment:
        return LocalStorage(Path(parts.path), base_url=settings.base_url)
    raise ValueError(f"unsupported storage URL {url!r}: use a folder path, file:///folder or s3://bucket/prefix")
