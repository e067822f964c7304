"""Local image storage (names, atomic writes) and bearer-key auth."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from gateway.errors import Unauthorized
from gateway.http.auth import check_bearer
from gateway.media import storage
from gateway.media.storage import LocalStorage, Storage, content_type_for
from gateway.settings import load_api_keys

BASE = "http://gateway.test"

# --- storage --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_put_then_get_round_trip(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "images", base_url=BASE)
    await store.put("img_abc123_0.png", b"\x89PNG data", "image/png")
    assert await store.get("img_abc123_0.png") == (b"\x89PNG data", "image/png")
    assert (tmp_path / "images" / "img_abc123_0.png").read_bytes() == b"\x89PNG data"


@pytest.mark.asyncio
async def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, base_url=BASE)
    await store.put("a.jpg", b"one", "image/jpeg")
    await store.put("a.jpg", b"two", "image/jpeg")
    assert await store.get("a.jpg") == (b"two", "image/jpeg")
    assert sorted(os.listdir(tmp_path)) == ["a.jpg"]
    assert stat.S_IMODE((tmp_path / "a.jpg").stat().st_mode) == storage.FILE_MODE


@pytest.mark.asyncio
async def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path, base_url=BASE)

    def broken_replace(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        await store.put("a.png", b"data", "image/png")
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_missing_object_is_none(tmp_path: Path) -> None:
    assert await LocalStorage(tmp_path, base_url=BASE).get("nothing.webp") is None


BAD_NAMES = [
    "",
    ".png",
    "../secret.png",
    "..%2Fsecret.png",
    "a/b.png",
    "a\\b.png",
    "/etc/passwd",
    "a.gif",
    "a.PNG",
    "a.png.png",
    "a.png\n",
    "a b.png",
    ".tmp-abc.png",
    "é.png",
    "x" * 129 + ".png",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret.png").write_bytes(b"outside the folder")
    store = LocalStorage(tmp_path / "inside", base_url=BASE)
    assert content_type_for(name) is None
    assert await store.get(name) is None
    with pytest.raises(ValueError, match="invalid storage name"):
        await store.put(name, b"x", "image/png")


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("a.png", "image/png"),
        ("A-b_9.jpg", "image/jpeg"),
        ("x.webp", "image/webp"),
        ("x" * 128 + ".png", "image/png"),
    ],
)
def test_valid_names(name: str, content_type: str) -> None:
    assert content_type_for(name) == content_type


@pytest.mark.asyncio
async def test_content_type_must_match_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        await LocalStorage(tmp_path, base_url=BASE).put("a.png", b"x", "image/jpeg")


@pytest.mark.asyncio
async def test_a_directory_with_a_valid_name_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    assert await LocalStorage(tmp_path, base_url=BASE).get("dir.png") is None


def test_local_storage_satisfies_the_protocol(tmp_path: Path) -> None:
    store: Storage = LocalStorage(tmp_path, base_url=BASE)
    assert asyncio.run(store.get("a.png")) is None


# --- auth -----------------------------------------------------------------------------------------------

KEYS = frozenset({"key-one", "key_two.2", "abc+/=="})

ACCEPTED = [
    ("Bearer key-one", "key-one"),
    ("bearer key_two.2", "key_two.2"),
    ("BEARER   abc+/==  ", "abc+/=="),
]


@pytest.mark.parametrize(("header", "key"), ACCEPTED)
@pytest.mark.parametrize("allow_anonymous", [False, True])
def test_valid_keys_are_returned(header: str, key: str, allow_anonymous: bool) -> None:
    assert check_bearer(header, KEYS, allow_anonymous) == key


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing bearer token"),
        ("", "Missing bearer token"),
        ("Bearer", "Missing bearer token"),
        ("Bearer   ", "Missing bearer token"),
        ("Basic a2V5LW9uZQ==", "Missing bearer token"),
        ("key-one", "Missing bearer token"),
        ("Bearer key-two", "Invalid API key"),
        ("Bearer key-one-and-more", "Invalid API key"),
        ("Bearer KEY-ONE", "Invalid API key"),
        ("Bearer ключ", "Invalid API key"),
    ],
)
def test_rejections(header: str | None, message: str) -> None:
    with pytest.raises(Unauthorized) as info:
        check_bearer(header, KEYS, allow_anonymous=False)
    assert info.value.message == message
    assert info.value.headers["WWW-Authenticate"] == "Bearer"
    assert info.value.details


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer wrong"])
def test_anonymous_mode_lets_unknown_callers_through(header: str | None) -> None:
    assert check_bearer(header, KEYS, allow_anonymous=True) is None


def test_no_keys_configured_rejects_everyone_unless_anonymous() -> None:
    with pytest.raises(Unauthorized):
        check_bearer("Bearer anything", frozenset(), allow_anonymous=False)
    assert check_bearer("Bearer anything", frozenset(), allow_anonymous=True) is None


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.http.auth as auth

    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    check_bearer("Bearer key-one", KEYS, allow_anonymous=False)
    assert len(calls) == len(KEYS)  # no early exit on the match
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_load_keys_from_env_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# production keys\n\nfile-key-1\n   file-key-2  \n  # indented comment\nshared\n")
    assert load_api_keys(" env-1, env-2 ,,shared ", keys_file) == frozenset(
        {"env-1", "env-2", "shared", "file-key-1", "file-key-2"}
    )


@pytest.mark.parametrize(("env", "expected"), [(None, frozenset()), ("", frozenset()), ("a", frozenset({"a"}))])
def test_load_keys_env_only(env: str | None, expected: frozenset[str]) -> None:
    assert load_api_keys(env, None) == expected


def test_load_keys_rejects_unsendable_keys_without_echoing_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="env entry 2") as info:
        load_api_keys("good,has space", None)
    assert "has space" not in str(info.value)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("ok\nnot\tok\n")
    with pytest.raises(ValueError, match=r"keys.txt:2"):
        load_api_keys(None, keys_file)


def test_load_keys_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_api_keys(None, tmp_path / "absent.txt")
