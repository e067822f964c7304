"""`python -m gateway`: start Triton (bundled, unless --triton-url names one) and the gateway; Ctrl-C stops both.

If the repository holds no pipeline yet, the demo is exported first: two tiny random-weight pipelines,
`imagen-v2` (PNDM) and `imagen-v3` (Euler), so the API spec's examples run as written.

`--workers N` (IMAGEN_WORKERS, default 1) runs N gateway processes sharing the port (uvicorn's workers, each
building its app with `gateway.asgi:create_app_from_env`). They need a job store shared between processes
(IMAGEN_JOBS_DB=postgresql://...): with the SQLite store (single-process) more than one is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway.app import create_app
from gateway.asgi import APP_FACTORY
from gateway.diffusion.manifest import load_manifests
from gateway.http.limits import GatewayConfig
from gateway.jobs.sqlite import StoreInUse, check_not_in_use
from gateway.observability import configure_logging
from gateway.settings import PROJECT_ROOT, Settings, SettingsError, add_cli_arguments, is_postgres_url
from gateway.triton.server import TritonNotFound, TritonServer, TritonStartError

log = logging.getLogger("gateway")

# (API name, weights seed, scheduler) of the demo pipelines.
DEMO_PIPELINES = (("imagen-v2", 0, "pndm"), ("imagen-v3", 1, "euler"))


def export_demo(settings: Settings) -> None:
    """Export the tiny demo pipelines with the export CLI (a subprocess: the gateway never imports torch)."""
    for name, seed, scheduler in DEMO_PIPELINES:
        print(f"gateway: exporting demo pipeline {name!r} into {settings.model_repository}", flush=True)
        subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments, no shell
            [
                sys.executable,
                "-m",
                "export",
                "--tiny",
                "--name",
                name,
                "--seed",
                str(seed),
                "--scheduler",
                scheduler,
                "--output",
                str(settings.model_repository),
                # Random weights: the export's ONNX-vs-torch check (run on these layouts by the tests) would only
                # delay the first start.
                "--no-validate",
            ],
            check=True,
            cwd=PROJECT_ROOT,
        )


def shared_job_store(jobs_db: object) -> bool:
    """True for a job store several processes can share (PostgreSQL); a file path is SQLite (one process).

    `str()` of a Path turns `postgresql://` into `postgresql:/`, so a Path is checked by its scheme alone."""
    return is_postgres_url(jobs_db) or str(jobs_db).strip().lower().startswith(("postgresql:", "postgres:"))


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple | list | set | frozenset):
        return ",".join(str(item) for item in value)
    return str(value)


def cli_environment(args: argparse.Namespace) -> dict[str, str]:
    """The command-line flags that were given, as the `IMAGEN_*` variables `Settings.from_env` reads.

    Worker processes build their settings from the environment only (`gateway.asgi`), so the launcher hands its
    overrides to them this way."""
    fields = Settings.__dataclass_fields__
    return {
        f"IMAGEN_{name.upper()}": _env_value(value)
        for name, value in vars(args).items()
        if value is not None and name in fields
    }


def is_loopback_host(host: str) -> bool:
    """Whether binding `host` serves this machine only: a loopback address or `localhost` (any other name may
    resolve anywhere, so it counts as public)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_config(settings: Settings, app: Any, **options: Any) -> GatewayConfig:
    """uvicorn (h11) with the limits it lacks against slow clients (`gateway.http.limits.GuardedH11Protocol`).

    uvicorn, not another server: it is what the gateway is tested on, and its h11 protocol needs only a deadline
    on request heads (its keep-alive timer stops at the first byte) and a connection cap, both added there.
    `limit_concurrency` is not used: it answers plain text and counts slow connections against real requests.
    Body reads are timed by `InboundLimitsMiddleware`; idle keep-alive connections close after 5 s (uvicorn's)."""
    return GatewayConfig(
        app,
        loop=settings.event_loop,  # the workers' loop; one process runs `serve` on it (`run_event_loop`)
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # a request head over 16 KiB is refused (400)
        access_log=False,  # gateway.access logs each request with its request id
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        **options,
    )


def serve_workers(settings: Settings, child_env: dict[str, str]) -> None:
    """N processes on one port: uvicorn binds the socket here and each worker imports the app factory.

    Blocks until SIGINT/SIGTERM (uvicorn's supervisor handles both, restarts dead workers, stops the rest)."""
    os.environ.update(child_env)
    print(
        f"gateway: starting {settings.workers} worker processes on {settings.base_url} "
        f"(requests: {settings.base_url}/v1/image-to-image). Ctrl-C stops.",
        flush=True,
    )
    config = server_config(settings, APP_FACTORY, factory=True, workers=settings.workers)
    # What `uvicorn.run` does for workers, with our Config (it pickles into each worker with its limits).
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


async def serve(settings: Settings) -> None:
    config = server_config(settings, create_app(settings))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn exposes only a flag
        await asyncio.sleep(0.05)
    if server.started:
        print(
            f"\ngateway: ready. Send requests to {settings.base_url}/v1/image-to-image "
            f"(models: {settings.base_url}/v1/models). Ctrl-C stops.\n",
            flush=True,
        )
    await task


EVENT_LOOPS = ("uvloop", "asyncio")


def run_event_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on the configured event loop (`IMAGEN_EVENT_LOOP`; uvloop measured no cheaper here than asyncio,
    docs/benchmarks.md, so asyncio is the default and uvloop a choice for other hosts to measure)."""
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="gateway processes sharing the port (IMAGEN_WORKERS, default 1; more than 1 needs PostgreSQL)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ).with_cli(args)
    except SettingsError as exc:  # a placeholder or short secret, an unsendable key: named, never shown
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    if settings.event_loop not in EVENT_LOOPS:
        print(f"gateway: error: IMAGEN_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}", file=sys.stderr)
        return 2
    if settings.workers < 1:
        print(f"gateway: error: IMAGEN_WORKERS must be 1 or more, not {settings.workers}", file=sys.stderr)
        return 2
    child_env: dict[str, str] = {}
    if settings.workers > 1:
        if not shared_job_store(settings.jobs_db):
            print(
                f"gateway: error: --workers {settings.workers} needs a job store shared between processes, but "
                f"IMAGEN_JOBS_DB is the SQLite file {settings.jobs_db} (one process only): set "
                "IMAGEN_JOBS_DB=postgresql://... to run several processes, or use --workers 1",
                file=sys.stderr,
            )
            return 2
        child_env = cli_environment(args)
        # A flag without an IMAGEN_* variable would silently not reach the workers: check they rebuild these.
        workers_settings = Settings.from_env({**os.environ, **child_env})
        differ = [f for f in Settings.__dataclass_fields__ if getattr(workers_settings, f) != getattr(settings, f)]
        if differ:
            print(f"gateway: error: these settings cannot reach worker processes: {', '.join(differ)}", file=sys.stderr)
            return 2
    if not shared_job_store(settings.jobs_db):
        try:
            check_not_in_use(Path(settings.jobs_db))
        except StoreInUse as exc:
            print(f"gateway: error: {exc}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level)
    if not settings.api_keys and not settings.allow_anonymous:
        print(
            "gateway: error: no API keys configured. Set IMAGEN_API_KEYS (comma-separated) or IMAGEN_API_KEYS_FILE, "
            "or pass --allow-anonymous for local development.",
            file=sys.stderr,
        )
        return 2
    if settings.allow_anonymous and not is_loopback_host(settings.host) and not settings.allow_anonymous_public:
        print(
            f"gateway: error: anonymous access on {settings.host} would serve anyone who can reach it. Bind a "
            "loopback address (--host 127.0.0.1), configure API keys, or pass --allow-anonymous-public "
            "(IMAGEN_ALLOW_ANONYMOUS_PUBLIC=1) to force it.",
            file=sys.stderr,
        )
        return 2
    if settings.allow_anonymous:
        log.warning("anonymous access is allowed: any request is served without an API key")
    if not load_manifests(settings.model_repository):
        if not settings.export_demo:
            print(f"gateway: error: no pipeline in {settings.model_repository}", file=sys.stderr)
            return 2
        try:
            export_demo(settings)
        except subprocess.CalledProcessError as exc:
            print(f"gateway: error: demo export failed ({exc})", file=sys.stderr)
            return 2

    # SIGTERM (docker stop, systemd) takes the same clean path as Ctrl-C, also before uvicorn installs its own
    # handlers: Triton runs in its own process group and would otherwise outlive us.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    triton: TritonServer | None = None
    try:
        if settings.triton_url is None:
            log_dir = PROJECT_ROOT / "var" / "log"
            log_dir.mkdir(parents=True, exist_ok=True)
            triton = TritonServer(
                settings.model_repository,
                http_port=settings.triton_http_port,
                grpc_port=settings.triton_grpc_port,
                metrics_port=settings.triton_metrics_port,
                python_env=settings.triton_python_env,
                cpu_budget=settings.triton_cpu_budget,
                log_file=log_dir / "tritonserver.log",
                lora_dir=settings.lora_folder,
            )
            print(f"gateway: starting Triton (log: {triton.log_file})", flush=True)
            triton.start()
            models = [m for manifest in load_manifests(settings.model_repository).values() for m in manifest.models]
            triton.wait_ready(models, timeout_s=settings.triton_timeout_s)
            print(f"gateway: Triton ready at {triton.grpc_url} (gRPC), {len(models)} models", flush=True)
        if settings.workers > 1:
            serve_workers(settings, child_env)
        else:
            run_event_loop(settings, serve(settings))
    except (TritonNotFound, TritonStartError) as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if triton is not None:
            print("gateway: stopping Triton", flush=True)
            triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
