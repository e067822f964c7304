"""One typed settings object, built once from the environment (`IMAGEN_*`) and then the CLI, which wins."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeGuard
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository" / "models"
# The LoRA adapters' default folder, beside the model repository (`Settings.lora_folder`).
LORA_FOLDER = "loras"
DEFAULT_TRITON_ENV = PROJECT_ROOT / ".venv-triton"
DEFAULT_STORAGE = PROJECT_ROOT / "var" / "images"
_TRUE = {"1", "true", "yes", "on"}
# RFC 6750 b64token: the only characters a bearer token can carry in an Authorization header.
API_KEY_PATTERN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
COMMENT_PREFIX = "#"
# API keys and the webhook secret seed shorter than this are refused at start-up (`IMAGEN_MIN_SECRET_LENGTH`).
# The docs generate `secrets.token_urlsafe(32)` keys (43 characters) and `secrets.token_hex(32)` seeds (64).
MIN_SECRET_LENGTH = 32
# Placeholders (the Kubernetes example Secrets' `CHANGE_ME...`, the README's `YOUR_API_KEY`): a secret that
# contains one, compared without case, `-`, `_`, `.` or spaces, is refused at start-up whatever its length.
PLACEHOLDER_MARKERS = ("changeme", "yourapikey", "replaceme")
GENERATE_HINT = 'generate one with python3 -c "import secrets; print(secrets.token_urlsafe(32))"'


# Per-key scheduling policy (`IMAGEN_API_KEYS_FILE`: options after the key, `KEY max_priority=0 weight=2
# class=batch`): the highest `priority` the key may ask for, its weight in the fair share between keys at one
# priority (a weight-2 key gets twice the work of a weight-1 key while both have jobs queued), and the class its
# queue-time metrics are labelled with (a bounded set the operator names, never the key).
DEFAULT_KEY_CLASS = "default"
KEY_CLASS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_KEY_WEIGHT = 1000.0


@dataclass(frozen=True)
class KeyPolicy:
    max_priority: int = 2
    weight: float = 1.0
    key_class: str = DEFAULT_KEY_CLASS


def key_owner(api_key: str) -> str:
    """The owner id of a key's jobs and policies: its SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class SettingsError(ValueError):
    """A setting the gateway refuses to start with; the message names the variable, never a secret value."""


def is_placeholder(value: str) -> bool:
    folded = re.sub(r"[-_.\s]", "", value).lower()
    return any(marker in folded for marker in PLACEHOLDER_MARKERS)


def check_secret(value: str, where: str, what: str, min_length: int) -> None:
    """Refuse a placeholder or a secret shorter than `min_length`, naming `where` and never the value."""
    if is_placeholder(value):
        raise SettingsError(f"{where}: {what} is a placeholder value, not a secret; {GENERATE_HINT}")
    if len(value) < min_length:
        raise SettingsError(
            f"{where}: {what} is shorter than {min_length} characters (IMAGEN_MIN_SECRET_LENGTH); {GENERATE_HINT}"
        )


_URL_SECRET_PARAM = re.compile(r"((?:^|&)[^=&]*(?:pass|secret|token|key|cred)[^=&]*=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its password (or a user part without one, a token) and secret-looking query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = _URL_SECRET_PARAM.sub(r"\1***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.strip().lower().startswith(POSTGRES_SCHEMES)


def job_store_location(value: str) -> Path | str:
    """`IMAGEN_JOBS_DB`: a PostgreSQL URL stays a string (a Path would fold its `//`); anything else is a file."""
    return value.strip() if is_postgres_url(value) else Path(value)


@dataclass(frozen=True, repr=False)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    model_repository: Path = DEFAULT_REPOSITORY
    # LoRA adapter files (`<name>.safetensors`); None: `loras/` beside the model repository, on its volume, where
    # the Triton runners look by default too (a bundled Triton is given this folder; a separate one reads its own
    # IMAGEN_LORA_DIR). Not inside it: Triton takes every folder of its repository for a model, and a default
    # tritonserver (`--exit-on-error=true`) stops at start on one it cannot load.
    lora_dir: Path | None = None
    # gRPC address of an external Triton; None starts the bundled one on the ports below.
    triton_url: str | None = None
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_python_env: Path = DEFAULT_TRITON_ENV
    triton_timeout_s: float = 120.0
    # The bundled Triton's CPU budget: its models' executions together run at most this many onnxruntime threads
    # (Triton's rate limiter, gateway.triton.server.cpu_budget_args), so the UNet and the VAEs of concurrent
    # requests do not each take every core at once; 0: no limit (a GPU host). Default: this host's cores.
    triton_cpu_budget: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Triton replicas (`triton_url` may list several host:port, comma-separated, or name a DNS name with several
    # addresses, re-resolved every `triton_resolve_interval_s`): health-checked every `triton_health_interval_s`; a
    # call tries at most `triton_max_attempts` replicas within `triton_timeout_s`, each try at most
    # `triton_attempt_timeout_s` (unset: the whole remaining budget, so a deadline is not retried elsewhere).
    triton_resolve_interval_s: float = 10.0
    triton_health_interval_s: float = 2.0
    triton_max_attempts: int = 3
    triton_attempt_timeout_s: float | None = None
    # Absolute base of the image URLs in responses; defaults to http://host:port.
    public_base_url: str | None = None
    storage_dir: Path = DEFAULT_STORAGE
    # Image storage: unset -> `storage_dir`; a folder path or file:// URL; or s3://bucket/prefix (S3-compatible,
    # endpoint/region/credentials from the usual AWS_* settings, `s3_endpoint_url` wins over AWS_ENDPOINT_URL).
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    api_keys: frozenset[str] = field(default_factory=frozenset)
    # The shortest API key or webhook secret seed `from_env` accepts (placeholders are refused at any length).
    min_secret_length: int = MIN_SECRET_LENGTH
    allow_anonymous: bool = False
    # Anonymous access on an address other than loopback: refused at start-up unless this forces it.
    allow_anonymous_public: bool = False
    max_body_bytes: int = 20 * 1024 * 1024
    # Inbound limits (gateway/http/limits.py): request-body bytes read and parsed at once in a process (a body
    # waits up to `body_budget_wait_s` for room, then 503 `overloaded`), the time a whole body may take (408),
    # the time a request head may take (the connection is closed), open connections per process (503, closed).
    max_inflight_body_bytes: int = 64 * 1024 * 1024
    body_budget_wait_s: float = 2.0
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    max_connections: int = 1000
    fetch_timeout_s: float = 10.0
    export_demo: bool = True
    log_level: str = "info"
    # Image work (base64, decode, resize, PNG encode; gateway/media/work.py): its own thread pool (unset: one per
    # core) and the request-side work that may wait for a thread beyond those (503 `overloaded` past it; a job's
    # own work waits); progressive JPEGs with more than `max_jpeg_scans` scans are refused (400 `invalid_image`).
    image_threads: int | None = None
    image_queue: int = 16
    max_jpeg_scans: int = 100
    # Text-encoder outputs kept per process, by (model, prompt, negative prompt, guidance on/off), LRU; 0: off.
    text_cache_size: int = 256
    # Gateway processes sharing the port (`python -m gateway --workers N`); more than one needs a shared job store.
    workers: int = 1
    # The event loop each gateway process runs: "asyncio" or "uvloop" (measured no cheaper here: docs/benchmarks.md).
    event_loop: str = "asyncio"
    # Outbound HTTP (image URLs, webhooks): hosts or CIDRs exempt from the private-address block (tests, private
    # deployments). Everything else must resolve to public addresses only.
    outbound_allow: tuple[str, ...] = ()
    # Outbound DNS (image URL and webhook hosts): its own thread pool (lookups in flight: 4 per thread at most,
    # beyond that refused at once) and a deadline per lookup, so a silent nameserver ties up nothing else.
    outbound_dns_threads: int = 4
    outbound_dns_timeout_s: float = 5.0
    # Jobs: the store, the worker pool (jobs denoising at once: their UNet steps share Triton batches) and the
    # admission limit on queued work (503 with Retry-After beyond it).
    # A file path (SQLite, one process) or a `postgresql://` URL (a store shared by several replicas).
    jobs_db: Path | str = PROJECT_ROOT / "var" / "jobs.sqlite3"
    max_running_jobs: int = 16
    max_queued_jobs: int = 256
    job_retries: int = 2
    # A job re-run after crashes more than this many times in all fails (`run_attempts_exhausted`) instead of
    # crash-looping; a worker's lease on a job lasts `job_lease_s` and is renewed at a third of it.
    max_run_attempts: int = 3
    job_lease_s: float = 30.0
    # Store errors (locked, full disk) are retried by workers with exponential backoff capped here.
    store_retry_max_s: float = 5.0
    # How long a running job waits for the image storage to come back (its reads and writes retried with backoff up
    # to `store_retry_max_s` apart) before it fails `store_unavailable`; `decoded_cache_bytes`: just-accepted jobs'
    # model inputs kept in memory for their first run (jobs/execute.py:DecodedInputs).
    storage_outage_s: float = 60.0
    decoded_cache_bytes: int = 64 * 2**20
    # Fallback polls for what the event bus may have missed: idle workers look for work, waiters re-read their
    # job, the outbox looks for due webhooks, at this interval. Progress goes on the bus at most this often per job.
    job_poll_interval_s: float = 1.0
    progress_publish_interval_s: float = 0.25
    retention_s: float = 24 * 3600.0
    # Image storage space: a write that would leave under `storage_min_free_bytes` free on the folder's volume, or
    # take the folder over `storage_quota_bytes` (unset: no quota; a folder only), is refused with 507
    # `insufficient_storage`. Stored objects of no job, and temp files of interrupted writes, older than
    # `storage_orphan_grace_s` are removed at start and every `storage_sweep_interval_s`.
    storage_min_free_bytes: int = 1024**3
    storage_quota_bytes: int | None = None
    storage_orphan_grace_s: float = 3600.0
    storage_sweep_interval_s: float = 3600.0
    # Webhooks: per-key secrets live in the job store; when set, a key's first secret is derived from this one
    # (random when unset).
    webhook_secret: str | None = None
    webhook_max_attempts: int = 5
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 10.0
    # After `POST /v1/webhook-secret/rotate`, the previous secret keeps signing beside the new one this long.
    webhook_secret_overlap_s: float = 24 * 3600.0
    # Per-key token bucket on job creation (requests per minute, burst); 0 disables.
    rate_limit_per_minute: float = 120.0
    rate_limit_burst: int = 20
    # Fairness between keys: at most this many queued + running jobs per key (429 `too_many_jobs` beyond it), and
    # a per-key budget of UNet samples (num_images x effective steps x 2 with guidance) per minute with a burst
    # (429 `rate_limited`); 0 disables either. The burst should cover the costliest request (4 x 150 x 2 = 1200).
    max_active_jobs_per_key: int = 32
    # Open event streams (`GET .../events`) per key and process (429 beyond it), so one key cannot hold every
    # connection slot; 0: no cap.
    max_event_streams_per_key: int = 16
    work_per_minute: float = 12000.0
    work_burst: int = 2400
    # Per-key budget of webhook control calls (redeliver and secret rotation share it): each redelivery makes the
    # gateway POST to a URL of the caller's choosing, so it is bounded like the work a job asks for. 0 disables.
    webhook_control_per_minute: float = 10.0
    webhook_control_burst: int = 10
    # Redis shared by the replicas (redis://host:6379/0): the rate limit then holds in total across them.
    redis_url: str | None = None
    # Priorities and shares (issue 24): per-key policies by owner id (`key_owner`; read from the key file's
    # options), the highest priority a key without one may ask for, the jobs a process may start beyond
    # `max_running_jobs` for higher-priority work when every slot is taken (the lower-priority jobs then pause at
    # their next denoising step), the window of finished jobs whose measured times make the wait estimates, and
    # the exact-result cache (off: every request runs).
    key_policies: Mapping[str, KeyPolicy] = field(default_factory=dict)
    default_max_priority: int = 2
    preempt_slots: int = 4
    estimate_window_s: float = 600.0
    result_cache: bool = True

    def key_policy(self, owner: str) -> KeyPolicy:
        """The policy of the key owning `owner`'s jobs (anonymous callers and keys without options: the default)."""
        found = self.key_policies.get(owner)
        return found if found is not None else KeyPolicy(max_priority=self.default_max_priority)

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else self.model_repository.parent / LORA_FOLDER

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def __repr__(self) -> str:
        """Every field, secrets masked: the API keys as a count, the webhook secret as `***`, and the password of
        every URL (job store, Redis, S3 endpoint...). AWS credentials are never settings (boto reads AWS_*)."""
        shown = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "api_keys":
                text = f"<{len(value)} keys>"
            elif spec.name == "key_policies":
                text = f"<{len(value)} key policies>"
            elif spec.name == "webhook_secret":
                text = "None" if value is None else "'***'"
            elif isinstance(value, str) and "://" in value:
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{spec.name}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def get(name: str) -> str | None:
            value = env.get(f"IMAGEN_{name}")
            return value if value not in (None, "") else None

        values: dict[str, object] = {}
        for name, convert in (
            ("host", str),
            ("port", int),
            ("model_repository", Path),
            ("lora_dir", Path),
            ("triton_url", str),
            ("triton_http_port", int),
            ("triton_grpc_port", int),
            ("triton_metrics_port", int),
            ("triton_python_env", Path),
            ("triton_timeout_s", float),
            ("triton_cpu_budget", int),
            ("triton_resolve_interval_s", float),
            ("triton_health_interval_s", float),
            ("triton_max_attempts", int),
            ("triton_attempt_timeout_s", float),
            ("public_base_url", str),
            ("storage_dir", Path),
            ("storage_url", str),
            ("s3_endpoint_url", str),
            ("max_body_bytes", int),
            ("max_inflight_body_bytes", int),
            ("body_budget_wait_s", float),
            ("body_timeout_s", float),
            ("header_timeout_s", float),
            ("max_connections", int),
            ("fetch_timeout_s", float),
            ("outbound_dns_threads", int),
            ("outbound_dns_timeout_s", float),
            ("log_level", str),
            ("image_threads", int),
            ("image_queue", int),
            ("max_jpeg_scans", int),
            ("text_cache_size", int),
            ("workers", int),
            ("event_loop", str),
            ("jobs_db", job_store_location),
            ("max_running_jobs", int),
            ("max_queued_jobs", int),
            ("job_retries", int),
            ("max_run_attempts", int),
            ("job_lease_s", float),
            ("store_retry_max_s", float),
            ("storage_outage_s", float),
            ("decoded_cache_bytes", int),
            ("job_poll_interval_s", float),
            ("progress_publish_interval_s", float),
            ("retention_s", float),
            ("storage_min_free_bytes", int),
            ("storage_quota_bytes", int),
            ("storage_orphan_grace_s", float),
            ("storage_sweep_interval_s", float),
            ("webhook_secret", str),
            ("webhook_max_attempts", int),
            ("webhook_backoff_s", float),
            ("webhook_timeout_s", float),
            ("webhook_secret_overlap_s", float),
            ("rate_limit_per_minute", float),
            ("rate_limit_burst", int),
            ("max_active_jobs_per_key", int),
            ("max_event_streams_per_key", int),
            ("work_per_minute", float),
            ("work_burst", int),
            ("webhook_control_per_minute", float),
            ("webhook_control_burst", int),
            ("redis_url", str),
            ("min_secret_length", int),
            ("default_max_priority", int),
            ("preempt_slots", int),
            ("estimate_window_s", float),
        ):
            raw = get(name.upper())
            if raw is not None:
                values[name] = convert(raw)
        for name in ("allow_anonymous", "allow_anonymous_public", "export_demo", "result_cache"):
            raw = get(name.upper())
            if raw is not None:
                values[name] = raw.strip().lower() in _TRUE
        allow = get("OUTBOUND_ALLOW")
        if allow is not None:
            values["outbound_allow"] = tuple(h.strip() for h in allow.split(",") if h.strip())
        min_length = values.get("min_secret_length", MIN_SECRET_LENGTH)
        if not isinstance(min_length, int) or min_length < 0:
            raise SettingsError(f"IMAGEN_MIN_SECRET_LENGTH must be 0 or more, not {min_length}")
        keys_file = get("API_KEYS_FILE")
        values["api_keys"] = load_api_keys(
            get("API_KEYS"), Path(keys_file) if keys_file else None, min_length=min_length
        )
        if keys_file:
            values["key_policies"] = load_key_policies(Path(keys_file))
        max_priority = values.get("default_max_priority", 2)
        if not isinstance(max_priority, int) or not 0 <= max_priority <= 2:
            raise SettingsError(f"IMAGEN_DEFAULT_MAX_PRIORITY must be 0, 1 or 2, not {max_priority}")
        webhook_secret = values.get("webhook_secret")
        if isinstance(webhook_secret, str):
            check_secret(webhook_secret, "IMAGEN_WEBHOOK_SECRET", "the webhook secret seed", min_length)
        return cls(**values)  # type: ignore[arg-type]

    def with_cli(self, args: argparse.Namespace) -> Settings:
        """Apply the CLI flags that were given (None means 'not given')."""
        given = {k: v for k, v in vars(args).items() if v is not None and k in self.__dataclass_fields__}
        return replace(self, **given)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags mirror the IMAGEN_* variables; defaults stay None so the environment is not overridden."""
    parser.add_argument("--host", help="address to listen on (IMAGEN_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (IMAGEN_PORT, default 8080)")
    parser.add_argument("--model-repository", type=Path, help="Triton model repository (IMAGEN_MODEL_REPOSITORY)")
    parser.add_argument("--triton-url", help="gRPC host:port of an external Triton (IMAGEN_TRITON_URL)")
    parser.add_argument("--triton-http-port", type=int, help="bundled Triton's HTTP port (default 8000)")
    parser.add_argument("--triton-grpc-port", type=int, help="bundled Triton's gRPC port (default 8001)")
    parser.add_argument("--triton-metrics-port", type=int, help="bundled Triton's metrics port (default 8002)")
    parser.add_argument("--public-base-url", help="base of image URLs in responses (IMAGEN_PUBLIC_BASE_URL)")
    parser.add_argument("--storage-dir", type=Path, help="folder for generated images (IMAGEN_STORAGE_DIR)")
    parser.add_argument(
        "--allow-anonymous",
        action="store_const",
        const=True,
        help="accept requests without an API key, for local development (IMAGEN_ALLOW_ANONYMOUS=1)",
    )
    parser.add_argument(
        "--allow-anonymous-public",
        action="store_const",
        const=True,
        help="allow --allow-anonymous on a non-loopback --host too (IMAGEN_ALLOW_ANONYMOUS_PUBLIC=1)",
    )
    parser.add_argument(
        "--no-export-demo",
        dest="export_demo",
        action="store_const",
        const=False,
        help="do not export the tiny demo pipelines when the repository is empty",
    )
    parser.add_argument("--log-level", help="uvicorn/gateway log level (default info)")


def load_api_keys(env_value: str | None, keys_file: Path | None, *, min_length: int = 0) -> frozenset[str]:
    """Union of a comma-separated env value and a file with one key per line.

    In the file, blank lines and lines starting with `#` are ignored. A key that could never be sent as a
    bearer token (spaces, non-ASCII...), a placeholder (`CHANGE_ME`...) or a key shorter than `min_length`
    raises SettingsError (a ValueError) at startup, naming the variable and where it is but not the key.
    A missing file raises FileNotFoundError: a configured key file that is absent is a deployment error.
    """
    found: list[tuple[str, str]] = []
    if env_value:
        found.extend((key.strip(), f"IMAGEN_API_KEYS env entry {i + 1}") for i, key in enumerate(env_value.split(",")))
    if keys_file is not None:
        for number, key, _options in _key_lines(keys_file):
            found.append((key, f"IMAGEN_API_KEYS_FILE {keys_file}:{number}"))
    keys: set[str] = set()
    for key, where in found:
        if not key:
            continue
        if not API_KEY_PATTERN.fullmatch(key):
            raise SettingsError(f"API key at {where} is not a valid bearer token (RFC 6750 b64token)")
        check_secret(key, where, "the API key", min_length)
        keys.add(key)
    return frozenset(keys)


def _key_lines(keys_file: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, key, options) of each key line: the key, then `name=value` options, blank-separated."""
    lines = []
    for number, line in enumerate(keys_file.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith(COMMENT_PREFIX):
            key, *options = stripped.split()
            if not all("=" in option for option in options):  # not `KEY name=value...`: the whole line is the key
                key, options = stripped, []
            lines.append((number, key, options))
    return lines


def load_key_policies(keys_file: Path) -> dict[str, KeyPolicy]:
    """The per-key policies of the key file (`KEY max_priority=0 weight=2 class=batch`), by owner id; a key
    without options has none (the defaults apply). An unknown option or a bad value raises SettingsError naming
    the line, never the key."""
    policies: dict[str, KeyPolicy] = {}
    for number, key, options in _key_lines(keys_file):
        if not options:
            continue
        where = f"IMAGEN_API_KEYS_FILE {keys_file}:{number}"
        values: dict[str, object] = {}
        for option in options:
            name, _, raw = option.partition("=")
            try:
                if name == "max_priority":
                    values["max_priority"] = int(raw)
                    ok = 0 <= int(raw) <= 2
                elif name == "weight":
                    values["weight"] = float(raw)
                    ok = 0.0 < float(raw) <= MAX_KEY_WEIGHT
                elif name == "class":
                    values["key_class"] = raw
                    ok = KEY_CLASS_PATTERN.fullmatch(raw) is not None
                else:
                    raise SettingsError(f"{where}: unknown key option '{name}' (max_priority, weight, class)")
            except ValueError as exc:
                if isinstance(exc, SettingsError):
                    raise
                ok = False
            if not ok:
                raise SettingsError(
                    f"{where}: bad '{name}' (max_priority 0-2; weight above 0 and at most {MAX_KEY_WEIGHT:g}; class "
                    "lowercase letters, digits, '_' or '-', at most 32)"
                )
        policies[key_owner(key)] = KeyPolicy(**values)  # type: ignore[arg-type]
    return policies
