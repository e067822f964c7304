"""Where generated (and copied input) images live; served back at `GET /v1/images/{name}`.

`Storage` is the seam for an object store later; `LocalStorage` keeps files in one folder. Names are
checked against a strict pattern so a client-supplied name can never leave that folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import anyio.to_thread

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(png|jpg|webp)$")
CONTENT_TYPES: Mapping[str, str] = MappingProxyType({"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"})
FILE_MODE = 0o644  # mkstemp creates 0600; stored images may be served by another process (nginx, a CDN agent)
SERVED_AT = "/v1/images/"  # the gateway's route for stored objects
_TEMP_PREFIX = ".tmp-"  # a leading dot never matches NAME_PATTERN, so partial files are never served


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


class LocalStorage:
    """Files in one folder, written atomically (temp file + fsync + os.replace), I/O off the event loop."""

    def __init__(self, root: Path, *, base_url: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")

    def url_for(self, name: str) -> str:
        """Local files are served by the gateway itself (`GET /v1/images/{name}`)."""
        return f"{self.base_url}{SERVED_AT}{name}"

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store `data`; a bad name, or a content type the extension disagrees with, is a bug: ValueError."""
        expected = content_type_for(name)
        if expected is None:
            raise ValueError(f"invalid storage name {name!r}")
        if content_type != expected:
            raise ValueError(f"content type {content_type!r} does not match {name!r} ({expected})")
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
