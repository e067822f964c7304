"""Local image storage (names, atomic and durable writes, space limits, the orphan sweep) and bearer-key auth."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import time
from pathlib import Path

import pytest

from gateway.errors import InsufficientStorage, Unauthorized, status_and_code
from gateway.http.auth import check_bearer
from gateway.jobs import naming, retention
from gateway.jobs.model import FAILED, Job
from gateway.jobs.sqlite import SqliteJobStore
from gateway.jobs.store import transition
from gateway.media import storage
from gateway.media.storage import LocalStorage, S3Storage, Storage, content_type_for, make_storage
from gateway.settings import Settings, load_api_keys
from tests.fixtures_s3 import S3Bucket, s3_bucket, s3_server  # noqa: F401 (pytest fixtures)
from tests.unit.fakes import InMemoryJobStore, make_job

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


@pytest.mark.parametrize("header", [None, ""])
def test_anonymous_mode_lets_callers_without_a_key_through(header: str | None) -> None:
    assert check_bearer(header, KEYS, allow_anonymous=True) is None


@pytest.mark.parametrize(
    ("header", "message"), [("Bearer wrong", "Invalid API key"), ("Basic abc", "Missing bearer token")]
)
def test_a_presented_unknown_key_is_401_even_in_anonymous_mode(header: str, message: str) -> None:
    """Issue 22, point 4: a mistyped key never becomes the shared anonymous user (who sees anonymous jobs)."""
    with pytest.raises(Unauthorized) as info:
        check_bearer(header, KEYS, allow_anonymous=True)
    assert info.value.message == message


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


# --- space: free-space floor, quota, a full disk -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_write_below_the_free_space_floor_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, base_url=BASE, min_free_bytes=2**62)  # more than any disk: "full"
    with pytest.raises(InsufficientStorage) as info:
        await store.put("img_a_input.png", b"data", "image/png")
    assert status_and_code(info.value) == (507, "insufficient_storage")
    assert "free" in (info.value.details or "")
    assert os.listdir(tmp_path) == []
    roomy = LocalStorage(tmp_path, base_url=BASE, min_free_bytes=1)  # the same folder, a floor it is above
    await roomy.put("img_a_input.png", b"data", "image/png")
    assert await roomy.get("img_a_input.png") == (b"data", "image/png")


@pytest.mark.asyncio
async def test_the_quota_counts_writes_overwrites_and_deletes(tmp_path: Path) -> None:
    (tmp_path / "old.png").write_bytes(b"x" * 4)  # there before: counted by the scan at start
    store = LocalStorage(tmp_path, base_url=BASE, quota_bytes=10)
    assert store.usage_bytes == 4
    await store.put("a.png", b"y" * 5, "image/png")
    assert store.usage_bytes == 9
    with pytest.raises(InsufficientStorage, match="Not enough storage space"):
        await store.put("b.png", b"z" * 2, "image/png")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "old.png"]
    await store.put("a.png", b"y" * 6, "image/png")  # replacing 5 bytes by 6: 4 + 6 = 10, at the quota
    assert store.usage_bytes == 10
    await store.delete("old.png")
    assert store.usage_bytes == 6
    await store.put("b.png", b"z" * 4, "image/png")
    assert store.usage_bytes == 10


@pytest.mark.asyncio
async def test_no_quota_and_no_floor_by_default(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, base_url=BASE)
    assert store.quota_bytes is None and store.min_free_bytes == 0
    await store.put("a.png", b"x" * 1000, "image/png")


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_a_full_disk_while_writing_is_insufficient_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    store = LocalStorage(tmp_path, base_url=BASE, quota_bytes=100)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        real_fsync(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(InsufficientStorage) as info:
        await store.put("a.png", b"data", "image/png")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    assert os.listdir(tmp_path) == []  # the temp file is gone
    assert store.usage_bytes == 0  # and its reservation released


@pytest.mark.asyncio
async def test_other_os_errors_are_not_turned_into_507(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(storage.os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        await LocalStorage(tmp_path, base_url=BASE).put("a.png", b"data", "image/png")


def test_make_storage_passes_the_space_settings(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path, storage_min_free_bytes=123, storage_quota_bytes=456)
    made = make_storage(settings)
    assert isinstance(made, LocalStorage)
    assert (made.min_free_bytes, made.quota_bytes) == (123, 456)
    default = make_storage(Settings(storage_url=f"file://{tmp_path}"))
    assert isinstance(default, LocalStorage)
    assert (default.min_free_bytes, default.quota_bytes) == (1024**3, None)
    env = Settings.from_env(
        {"IMAGEN_STORAGE_MIN_FREE_BYTES": "5", "IMAGEN_STORAGE_QUOTA_BYTES": "6", "IMAGEN_STORAGE_ORPHAN_GRACE_S": "7"}
    )
    assert (env.storage_min_free_bytes, env.storage_quota_bytes, env.storage_orphan_grace_s) == (5, 6, 7.0)


# --- durability: the folder is fsynced after the rename; SQLite commits with synchronous=FULL -------------


@pytest.mark.asyncio
async def test_the_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        events.append(("replace", Path(str(dst)).name))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    await LocalStorage(tmp_path, base_url=BASE).put("img_a_0.png", b"data", "image/png")
    assert events == [("fsync", "file"), ("replace", "img_a_0.png"), ("fsync", "dir")]


def test_the_sqlite_job_store_commits_with_synchronous_full(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        db = store._db  # the store's one connection: synchronous is a per-connection setting
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
    finally:
        asyncio.run(store.close())


# --- clean-up: listing old objects, temp files, the orphan sweep -----------------------------------------


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


@pytest.mark.asyncio
async def test_iter_older_than_lists_old_valid_names_only_and_resyncs_usage(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, base_url=BASE, quota_bytes=10_000)
    await store.put("old.png", b"1" * 10, "image/png")
    await store.put("new.png", b"2" * 20, "image/png")
    _age(tmp_path / "old.png", 7200)
    for foreign in (".tmp-abc", "notes.txt"):
        (tmp_path / foreign).write_bytes(b"3" * 30)
        _age(tmp_path / foreign, 7200)
    (tmp_path / "sub.png").mkdir()
    _age(tmp_path / "sub.png", 7200)
    assert [name async for name in store.iter_older_than(time.time() - 3600)] == ["old.png"]
    assert store.usage_bytes == 10 + 20 + 30 + 30  # every file in the folder, as scanned


@pytest.mark.asyncio
async def test_remove_temp_older_than_keeps_live_writes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, base_url=BASE)
    (tmp_path / ".tmp-stale").write_bytes(b"partial")
    _age(tmp_path / ".tmp-stale", 7200)
    (tmp_path / ".tmp-live").write_bytes(b"being written")
    (tmp_path / "kept.png").write_bytes(b"x")
    _age(tmp_path / "kept.png", 7200)
    assert await store.remove_temp_older_than(time.time() - 3600) == 1
    assert sorted(os.listdir(tmp_path)) == [".tmp-live", "kept.png"]


@pytest.mark.parametrize(
    ("name", "job_id"),
    [
        ("img_transform_0123456789abcdef01234567_input.jpg", "img_transform_0123456789abcdef01234567"),
        ("img_transform_0123456789abcdef01234567_0.png", "img_transform_0123456789abcdef01234567"),
        ("img_transform_0123456789abcdef01234567_3_run2.png", "img_transform_0123456789abcdef01234567"),
        ("img_x_input.webp", "img_x"),
        ("img_x_0.jpg", "img_x"),  # outputs in every stored format (the sweep once knew only PNG)
        ("img_x_1.webp", "img_x"),
        ("img_x_2_run3.jpg", "img_x"),
        ("something.png", None),
        ("img_x_input.gif", None),
        ("img_x_0.gif", None),
        ("img_x_run2.png", None),
    ],
)
def test_the_names_jobs_write_are_the_names_the_sweep_and_the_route_recognise(name: str, job_id: str | None) -> None:
    stored = naming.parse_name(name)
    assert (stored.job_id if stored else None) == job_id
    if stored is not None:
        assert stored.is_input == ("_input." in name)


@pytest.mark.parametrize("extension", sorted(storage.CONTENT_TYPES))
def test_the_names_written_parse_back(extension: str) -> None:
    job_id = "img_transform_012345678901234567890123"  # a hex suffix of digits only
    for name, is_input in [
        (naming.input_name(job_id, extension), True),
        (naming.output_name(job_id, 0, 1, extension), False),
        (naming.output_name(job_id, 12, 3, extension), False),
        (naming.output_name(job_id, 3, extension=extension, token=naming.new_output_token()), False),
    ]:
        assert naming.parse_name(name) == naming.StoredName(job_id, is_input), name
        assert storage.NAME_PATTERN.fullmatch(name), name


def test_output_names_are_not_derivable_from_the_job_id() -> None:
    """Issue 22, point 9: output URLs are capabilities; job ids are in logs and headers."""
    job_id = "img_transform_012345678901234567890123"
    first, second = (naming.output_name(job_id, 0, token=naming.new_output_token()) for _ in range(2))
    assert first != second and first.startswith(f"{job_id}_0_") and len(first) - len(f"{job_id}_0_.png") == 32


@pytest.mark.asyncio
@pytest.mark.parametrize("extension", sorted(storage.CONTENT_TYPES))
async def test_the_sweep_removes_orphaned_outputs_of_every_format(tmp_path: Path, extension: str) -> None:
    """PNG, JPEG and WebP outputs alike: of a job that is gone, and a finished job's unlisted partial output."""
    images = LocalStorage(tmp_path, base_url=BASE)
    jobs = InMemoryJobStore()
    done = await jobs.create(make_job("img_done"))
    _, applied = await transition(jobs, done, functools.partial(Job.ended, status=FAILED))
    assert applied
    orphans = [
        naming.output_name("img_gone", 0, 1, extension),
        naming.output_name("img_done", 1, 2, extension),
        naming.output_name("img_done", 2, extension=extension, token=naming.new_output_token()),
    ]
    for name in orphans:
        await images.put(name, b"x", storage.CONTENT_TYPES[extension])
        _age(tmp_path / name, 7200)
    result = await retention.sweep_storage(jobs, images, older_than=time.time() - 3600)
    assert result == retention.SweepResult(orphans=3, temp_files=0)
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_the_sweep_removes_what_no_job_owns(tmp_path: Path) -> None:
    images = LocalStorage(tmp_path, base_url=BASE)
    jobs = InMemoryJobStore()
    await jobs.create(make_job("img_live"))  # queued: its outputs may be being written
    done = await jobs.create(make_job("img_done"))
    _, applied = await transition(jobs, done, functools.partial(Job.ended, status=FAILED))
    assert applied
    kept_or_removed = {
        "img_live_input.png": True,  # a live job's input
        "img_live_0.png": True,  # a live job's output being written
        "img_done_input.png": True,  # a finished job's input
        "img_done_0.png": False,  # a finished job's partial output, which it does not list
        "img_gone_input.jpg": False,  # no such job: the input of a creation that died before its insert
        "img_gone_1_run2.png": False,
        "unrelated.png": True,  # not a name jobs write: left alone
    }
    for name in kept_or_removed:
        await images.put(name, b"x", storage.CONTENT_TYPES[name.rsplit(".", 1)[1]])
        _age(tmp_path / name, 7200)
    await images.put("img_fresh_input.png", b"x", "image/png")  # a creation in progress: too young to touch
    (tmp_path / ".tmp-interrupted").write_bytes(b"partial")
    _age(tmp_path / ".tmp-interrupted", 7200)

    result = await retention.sweep_storage(jobs, images, older_than=time.time() - 3600)

    assert result == retention.SweepResult(orphans=3, temp_files=1)
    expected = {name for name, kept in kept_or_removed.items() if kept} | {"img_fresh_input.png"}
    assert set(os.listdir(tmp_path)) == expected
    assert jobs.calls["get"] == 3  # one store read per job with old objects (img_live, img_done, img_gone)


@pytest.mark.asyncio
async def test_the_sweeper_runs_at_once_then_every_interval(tmp_path: Path) -> None:
    images = LocalStorage(tmp_path, base_url=BASE)
    sweeper = retention.StorageSweeper(InMemoryJobStore(), images, grace_s=0, interval_s=3600)
    await images.put("img_gone_input.png", b"x", "image/png")
    _age(tmp_path / "img_gone_input.png", 10)
    assert await sweeper.run_if_due() == retention.SweepResult(orphans=1, temp_files=0)
    await images.put("img_gone2_input.png", b"x", "image/png")
    _age(tmp_path / "img_gone2_input.png", 10)
    assert await sweeper.run_if_due() is None  # not due for an hour
    assert os.listdir(tmp_path) == ["img_gone2_input.png"]


async def test_s3_lists_old_objects_under_its_prefix_only(s3_bucket: S3Bucket) -> None:  # noqa: F811
    images = S3Storage.from_url(s3_bucket.url("imagen/images"), base_url=BASE)
    try:
        await images.put("img_a_input.png", b"x", "image/png")
        other = S3Storage.from_url(s3_bucket.url("imagen/images/deeper"), base_url=BASE)
        await other.put("img_b_input.png", b"x", "image/png")  # below the prefix: not ours to list
        await other.aclose()
        listed = [name async for name in images.iter_older_than(time.time() + 60)]
        assert listed == ["img_a_input.png"]
        assert [name async for name in images.iter_older_than(time.time() - 3600)] == []
        assert await images.remove_temp_older_than(time.time()) == 0
    finally:
        await images.aclose()


@pytest.mark.asyncio
async def test_stored_inputs_are_owner_only_and_outputs_not_world_readable(tmp_path: Path) -> None:
    """Issue 22, point 9: a caller's upload (EXIF and all) is not readable by other local users."""
    store = LocalStorage(tmp_path, base_url=BASE)
    await store.put(naming.input_name("img_a", "jpg"), b"in", "image/jpeg")
    await store.put(naming.output_name("img_a", 0, token=naming.new_output_token()), b"out", "image/png")
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in os.listdir(tmp_path)}
    assert modes.pop("img_a_input.jpg") == 0o600
    assert list(modes.values()) == [0o640]


def test_the_sqlite_job_store_is_owner_only(tmp_path: Path) -> None:
    """Issue 22, point 9: the job store holds every key's webhook secrets; an existing 0644 file is narrowed."""
    from gateway.jobs.sqlite import SqliteJobStore

    path = tmp_path / "jobs.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    store = SqliteJobStore(path)
    try:
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            if (tmp_path / name).exists():
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        asyncio.run(store.close())
