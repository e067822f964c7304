"""Issue 22, points 5 and 9: the settings never show a secret (repr, str, logs), and the gateway refuses at
start-up an API key or webhook secret seed that is a placeholder or shorter than `IMAGEN_MIN_SECRET_LENGTH`
(default 32), in one line naming the variable and never the value, exit 2."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import gateway.__main__ as launcher
from gateway.settings import PROJECT_ROOT, Settings, SettingsError

EXAMPLE_SECRETS = PROJECT_ROOT / "docker" / "k8s" / "examples" / "secrets.example.yaml"
GOOD_KEY = secrets.token_urlsafe(32)  # what the docs generate: 43 characters
GOOD_SEED = secrets.token_hex(32)  # 64 characters


def _example_values() -> dict[str, str]:
    """The placeholder values the Kubernetes example Secrets (and, before issue 22, the base) carry."""
    values: dict[str, str] = {}
    for doc in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()):
        if doc and doc.get("kind") == "Secret":
            values.update(doc.get("stringData") or {})
    return values


# --- repr / str -----------------------------------------------------------------------------------------------


def test_repr_and_str_never_show_a_secret() -> None:
    settings = Settings(
        api_keys=frozenset({GOOD_KEY, "second-key-" + "k" * 30}),
        webhook_secret=GOOD_SEED,
        jobs_db="postgresql://imagen:pg-pass-4242@db.internal:5432/imagen?sslpassword=ssl-pass-77",
        redis_url="redis://:redis-pass-1717@redis.internal:6379/0",
        s3_endpoint_url="https://AKIDEXAMPLE:s3-secret-9999@minio.internal:9000",
        storage_url="s3://imagen-images/outputs",
    )
    for text in (repr(settings), str(settings), f"{settings!r}", f"{settings}"):
        for secret in (
            GOOD_KEY,
            "second-key-",
            GOOD_SEED,
            "pg-pass-4242",
            "ssl-pass-77",
            "redis-pass-1717",
            "s3-secret-9999",
        ):
            assert secret not in text, f"{secret!r} shows in the settings' repr"
        # Still useful to read: where things are, and how many keys.
        assert "db.internal:5432" in text and "redis.internal:6379" in text and "minio.internal:9000" in text
        assert "s3://imagen-images/outputs" in text
        assert "api_keys=<2 keys>" in text
        assert "webhook_secret='***'" in text
    assert "webhook_secret=None" in repr(Settings())
    # The masking is for display only: the values themselves are intact.
    assert settings.webhook_secret == GOOD_SEED and GOOD_KEY in settings.api_keys


def test_repr_of_settings_from_the_environment_hides_the_secrets(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys\n{GOOD_KEY}\n")
    settings = Settings.from_env(
        {
            "IMAGEN_API_KEYS_FILE": str(keys),
            "IMAGEN_WEBHOOK_SECRET": GOOD_SEED,
            "IMAGEN_JOBS_DB": "postgres://u:pw-0123456789@db:5432/x",
            "IMAGEN_REDIS_URL": "rediss://user:pw-9876543210@redis:6380/1",
        }
    )
    text = repr(settings)
    assert GOOD_KEY not in text and GOOD_SEED not in text
    assert "pw-0123456789" not in text and "pw-9876543210" not in text
    assert "u:***@db:5432" in text and "user:***@redis:6380" in text


# --- refused at start-up ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["tiny-key-7", "x" * 31, "key-0123456789-0123456789"])
def test_a_short_api_key_is_refused_naming_the_variable_not_the_key(key: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"IMAGEN_API_KEYS": f"{GOOD_KEY},{key}"})
    message = str(info.value)
    assert "IMAGEN_API_KEYS" in message and "entry 2" in message and "32" in message
    assert "IMAGEN_MIN_SECRET_LENGTH" in message
    assert key not in message and "\n" not in message
    keys = tmp_path / "api_keys.txt"
    keys.write_text(f"# comment\n{GOOD_KEY}\n{key}\n")
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"IMAGEN_API_KEYS_FILE": str(keys)})
    assert "IMAGEN_API_KEYS_FILE" in str(info.value) and "api_keys.txt:3" in str(info.value)
    assert key not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "CHANGE_ME",
        "CHANGE_ME-64-hex-characters",
        "change_me-" + "0" * 40,
        "ChangeMe" + "0" * 40,
        "0" * 20 + "CHANGE-ME" + "0" * 20,
        "YOUR_API_KEY" + "0" * 32,
    ],
)
def test_a_placeholder_is_refused_whatever_its_length(value: str) -> None:
    for variable in ("IMAGEN_API_KEYS", "IMAGEN_WEBHOOK_SECRET"):
        with pytest.raises(SettingsError, match="placeholder") as info:
            Settings.from_env({variable: value, "IMAGEN_MIN_SECRET_LENGTH": "1"})
        assert variable in str(info.value)
        assert value not in str(info.value)


def test_the_placeholders_of_the_kubernetes_example_are_refused() -> None:
    """What `docker/k8s/examples/secrets.example.yaml` holds never starts a gateway, were it applied as is."""
    values = _example_values()
    with pytest.raises(SettingsError, match="IMAGEN_WEBHOOK_SECRET"):
        Settings.from_env({"IMAGEN_WEBHOOK_SECRET": values["IMAGEN_WEBHOOK_SECRET"]})
    with pytest.raises(SettingsError, match="IMAGEN_WEBHOOK_SECRET"):
        Settings.from_env({"IMAGEN_WEBHOOK_SECRET": values["IMAGEN_WEBHOOK_SECRET"], "IMAGEN_MIN_SECRET_LENGTH": "1"})
    # The example's key file holds a comment only: no key at all (the launcher then refuses to start without keys).
    keys = [line for line in values["api_keys"].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert keys == []


def test_a_short_webhook_secret_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"IMAGEN_WEBHOOK_SECRET": "s" * 31})
    assert "IMAGEN_WEBHOOK_SECRET" in str(info.value) and "s" * 31 not in str(info.value)


def test_good_secrets_and_the_minimum_setting() -> None:
    settings = Settings.from_env({"IMAGEN_API_KEYS": f"{GOOD_KEY}, {'k' * 32}", "IMAGEN_WEBHOOK_SECRET": GOOD_SEED})
    assert settings.api_keys == frozenset({GOOD_KEY, "k" * 32})
    assert settings.webhook_secret == GOOD_SEED
    assert settings.min_secret_length == Settings().min_secret_length == 32
    # Lowered (tests, a migration window): shorter keys pass, placeholders still do not.
    lowered = Settings.from_env(
        {"IMAGEN_API_KEYS": "key-0001", "IMAGEN_WEBHOOK_SECRET": "seed-0001", "IMAGEN_MIN_SECRET_LENGTH": "8"}
    )
    assert lowered.api_keys == frozenset({"key-0001"}) and lowered.min_secret_length == 8
    with pytest.raises(SettingsError, match="IMAGEN_MIN_SECRET_LENGTH"):
        Settings.from_env({"IMAGEN_MIN_SECRET_LENGTH": "-1"})
    # No keys, no seed: nothing to check (the launcher's own "no API keys" refusal stays).
    assert Settings.from_env({}).api_keys == frozenset()


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("IMAGEN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEN_STORAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("IMAGEN_JOBS_DB", str(tmp_path / "jobs.sqlite3"))
    saved_sigterm = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved_sigterm)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGEN_API_KEYS", "short-key-0000"),
        ("IMAGEN_API_KEYS", "CHANGE_ME-" + "0" * 40),
        ("IMAGEN_WEBHOOK_SECRET", "CHANGE_ME-64-hex-characters"),
        ("IMAGEN_WEBHOOK_SECRET", "too-short-seed"),
    ],
)
def test_the_launcher_refuses_in_one_line_with_exit_2(
    variable: str,
    value: str,
    clean_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IMAGEN_API_KEYS", GOOD_KEY)
    monkeypatch.setenv(variable, value)
    assert launcher.main(["--model-repository", str(tmp_path / "models"), "--triton-url", "t:8001"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gateway: error: {variable}")
    assert value not in err and value not in out
    assert not (tmp_path / "models").exists() and not (tmp_path / "jobs.sqlite3").exists()  # refused first
