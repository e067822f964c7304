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

Space (a folder): a write that would leave less than `min_free_bytes` free on the folder's volume, or take the
folder over `quota_bytes`, is refused before anything is written, and a full disk met while writing (ENOSPC,
EDQUOT) is the same error: `InsufficientStorage` (507 `insufficient_storage`). The quota counts bytes this
process wrote or removed from a scan at start, re-synchronised by every `iter_older_than` scan (so replicas
sharing one volume see each other's writes at the next sweep); the free-space floor is read from the volume on
every write. Durability: a file is fsynced, renamed into place, then its folder is fsynced, so once `put`
returns the object survives a power loss.
Clean-up: `iter_older_than` lists objects last modified before a time and `remove_temp_older_than` removes
the temp files of interrupted writes; `gateway.jobs.retention` uses them to remove what no job owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread
import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from gateway.errors import InsufficientStorage, StoreUnavailable
from gateway.observability import staged

if TYPE_CHECKING:
    from gateway.settings import Settings

_INPUT_SUFFIX = re.compile(r"_input\.[a-z]+$")  # jobs/naming.py's input names
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(png|jpg|webp)$")
CONTENT_TYPES: Mapping[str, str] = MappingProxyType({"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"})
# Stored files: outputs readable by the owner and its group (a process that serves them may join the group;
# their names are capabilities), stored inputs by the owner only (the caller's upload, served to its key alone).
FILE_MODE = 0o640
INPUT_FILE_MODE = 0o600
SERVED_AT = "/v1/images/"  # the gateway's route for stored objects
_TEMP_PREFIX = ".tmp-"  # a leading dot never matches NAME_PATTERN, so partial files are never served

# S3: bucket names as S3 allows them (3-63 characters, lowercase, digits, dots, hyphens).
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
S3_MAX_CONNECTIONS = 16  # botocore's HTTP pool, and the threads that use it
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3  # botocore "standard" retries (throttling, 5xx, connection errors), first try included
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
S3_LIST_PAGE = 1000  # keys per list_objects_v2 call (S3's maximum)
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

    async def open(self, name: str) -> StoredStream | None:
        """The object as chunks read as they are sent (never whole in memory), or None when there is none."""
        ...

    def iter_older_than(self, cutoff: float) -> AsyncIterator[str]:
        """Names of the stored objects last modified before `cutoff` (a Unix time), for clean-up sweeps."""
        ...

    async def remove_temp_older_than(self, cutoff: float) -> int:
        """Remove partial objects of interrupted writes older than `cutoff`; return how many."""
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


STREAM_CHUNK_BYTES = 64 * 1024  # `open` reads stored objects this much at a time


@dataclass(frozen=True)
class StoredStream:
    """An object being read: its content type, its size when known, and its bytes as they are read."""

    content_type: str
    size: int | None
    chunks: AsyncIterator[bytes]


def served_url(base_url: str, name: str) -> str:
    """The gateway's own URL for a stored object (`GET /v1/images/{name}`)."""
    return f"{base_url.rstrip('/')}{SERVED_AT}{name}"


def _no_space(details: str) -> InsufficientStorage:
    return InsufficientStorage("Not enough storage space to store the image", details)


class LocalStorage:
    """Files in one folder, written atomically (temp file + fsync + os.replace + folder fsync), I/O off the event
    loop; writes refused below a free-space floor or over a quota (see the module docstring)."""

    def __init__(self, root: Path, *, base_url: str, min_free_bytes: int = 0, quota_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")
        self.min_free_bytes = max(0, min_free_bytes)
        self.quota_bytes = quota_bytes if quota_bytes is not None and quota_bytes > 0 else None
        self._usage_lock = threading.Lock()  # writes run on several threads
        self._usage = self._scan_usage() if self.quota_bytes is not None else 0

    @property
    def usage_bytes(self) -> int:
        """Bytes in the folder as this process counts them (see the module docstring)."""
        return self._usage

    def url_for(self, name: str) -> str:
        """Local files are served by the gateway itself (`GET /v1/images/{name}`)."""
        return served_url(self.base_url, name)

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store `data`; a bad name, or a content type the extension disagrees with, is a bug: ValueError."""
        check_put(name, content_type)
        await anyio.to_thread.run_sync(staged("storage", self._write), name, data)

    async def get(self, name: str) -> tuple[bytes, str] | None:
        """Client-supplied names that are not valid simply do not exist (None), like missing ones."""
        content_type = content_type_for(name)
        if content_type is None:
            return None
        data = await anyio.to_thread.run_sync(self._read, name)
        return None if data is None else (data, content_type)

    async def open(self, name: str) -> StoredStream | None:
        """The file in chunks read off the event loop; the file is closed when the stream ends or is dropped."""
        content_type = content_type_for(name)
        if content_type is None:
            return None
        opened = await anyio.to_thread.run_sync(self._open, name)
        if opened is None:
            return None
        handle, size = opened

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await anyio.to_thread.run_sync(handle.read, STREAM_CHUNK_BYTES):
                    yield chunk
            finally:
                handle.close()

        return StoredStream(content_type, size, chunks())

    def _open(self, name: str) -> tuple[BinaryIO, int] | None:
        try:
            handle = (self.root / name).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            return None
        return handle, os.fstat(handle.fileno()).st_size

    async def delete(self, name: str) -> None:
        if content_type_for(name) is not None:
            await anyio.to_thread.run_sync(self._unlink, name)

    async def aclose(self) -> None:
        """Nothing to release (same shape as `S3Storage.aclose`)."""

    async def iter_older_than(self, cutoff: float) -> AsyncIterator[str]:
        """Valid object names modified before `cutoff` (one scan of the folder, which also re-counts the quota's
        usage); temp files and foreign names are never listed."""
        for name in await anyio.to_thread.run_sync(self._scan_older_than, cutoff):
            yield name

    async def remove_temp_older_than(self, cutoff: float) -> int:
        """Temp files (`.tmp-*`) of writes interrupted by a crash; a live write's is younger than any sane cutoff."""
        return await anyio.to_thread.run_sync(self._remove_temp, cutoff)

    def _scan_usage(self) -> int:
        total = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def _scan_older_than(self, cutoff: float) -> list[str]:
        names: list[str] = []
        total = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except OSError:  # removed while we looked
                    continue
                total += info.st_size
                if info.st_mtime < cutoff and content_type_for(entry.name) is not None:
                    names.append(entry.name)
        with self._usage_lock:
            self._usage = total
        return names

    def _remove_temp(self, cutoff: float) -> int:
        removed = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(_TEMP_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if entry.is_file(follow_symlinks=False) and info.st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                        self._count(-info.st_size)
        return removed

    def _count(self, delta: int) -> None:
        with self._usage_lock:
            self._usage = max(0, self._usage + delta)

    def _reserve(self, size: int, replaced: int) -> int:
        """Refuse a write of `size` bytes (replacing `replaced`) below the free-space floor or over the quota;
        else count it and return the bytes counted."""
        if self.min_free_bytes:
            volume = os.statvfs(self.root)
            free = volume.f_bavail * volume.f_frsize
            if free - size < self.min_free_bytes:
                raise _no_space(
                    f"The image storage keeps at least {self.min_free_bytes} bytes free ({free} are); retry later"
                )
        growth = size - replaced
        with self._usage_lock:
            if self.quota_bytes is not None and growth > 0 and self._usage + growth > self.quota_bytes:
                raise _no_space(f"The image storage quota of {self.quota_bytes} bytes is used up; retry later")
            self._usage += growth
        return growth

    def _unlink(self, name: str) -> None:
        path = self.root / name
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self._count(-size)

    def _fsync_dir(self) -> None:
        """Make the rename itself durable (POSIX: a new directory entry survives a crash once the folder is fsynced)."""
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, name: str, data: bytes) -> None:
        target = self.root / name
        try:
            replaced = target.stat().st_size
        except OSError:
            replaced = 0
        growth = self._reserve(len(data), replaced)
        temp: str | None = None
        placed = False
        try:
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.root)
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), INPUT_FILE_MODE if _INPUT_SUFFIX.search(name) else FILE_MODE)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
            placed = True
            self._fsync_dir()
        except BaseException as exc:
            if not placed:
                self._count(-growth)
                if temp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
                raise _no_space("The disk holding the image storage is full; retry later") from exc
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

    async def open(self, name: str) -> StoredStream | None:
        """The object's body in chunks, each read on the pool; the body is closed when the stream ends."""
        content_type = content_type_for(name)
        if content_type is None:
            return None
        response = await self._call("get", self._get_object, self.key_for(name))
        if response is None:
            return None
        body = response["Body"]
        size = response.get("ContentLength")

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await self._call("get", body.read, STREAM_CHUNK_BYTES):
                    yield chunk
            finally:
                body.close()

        return StoredStream(content_type, size if isinstance(size, int) else None, chunks())

    def _get_object(self, key: str) -> Any:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise

    async def delete(self, name: str) -> None:
        """Deleting a missing object is not an error (S3 answers 204 either way)."""
        if content_type_for(name) is not None:
            await self._call("delete", self._client.delete_object, Bucket=self.bucket, Key=self.key_for(name))

    async def iter_older_than(self, cutoff: float) -> AsyncIterator[str]:
        """Valid names under the prefix (not below it) last modified before `cutoff`, a page of keys at a time."""
        token: str | None = None
        while True:
            options: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": S3_LIST_PAGE}
            if token is not None:
                options["ContinuationToken"] = token
            page: dict[str, Any] = await self._call("list", self._client.list_objects_v2, **options)
            for item in page.get("Contents", ()):
                name = str(item["Key"])[len(self.prefix) :]
                if content_type_for(name) is not None and item["LastModified"].timestamp() < cutoff:
                    yield name
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or token is None:
                return

    async def remove_temp_older_than(self, cutoff: float) -> int:
        """A single S3 PUT leaves no partial object behind: nothing to remove."""
        return 0

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

    def folder(root: Path) -> LocalStorage:
        return LocalStorage(
            root,
            base_url=settings.base_url,
            min_free_bytes=settings.storage_min_free_bytes,
            quota_bytes=settings.storage_quota_bytes,
        )

    if url is None:
        return folder(settings.storage_dir)
    if "://" not in url:
        return folder(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Storage.from_url(url, base_url=settings.base_url, endpoint_url=settings.s3_endpoint_url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and not parts.query and not parts.fragment:
        return folder(Path(parts.path))
    raise ValueError(f"unsupported storage URL {url!r}: use a folder path, file:///folder or s3://bucket/prefix")
