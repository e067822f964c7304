"""`python -m gateway`: start Triton (bundled, unless --triton-url names one) and the gateway; Ctrl-C stops both.

If the repository holds no pipeline yet, the demo is exported first: two tiny random-weight pipelines,
`imagen-v2` (PNDM) and `imagen-v3` (Euler), so the API spec's examples run as written.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys

import uvicorn

from gateway.app import create_app
from gateway.diffusion.manifest import load_manifests
from gateway.observability import configure_logging
from gateway.settings import PROJECT_ROOT, Settings, add_cli_arguments
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
            ],
            check=True,
            cwd=PROJECT_ROOT,
        )


async def serve(settings: Settings) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        access_log=False,  # gateway.access logs each request with its request id
    )
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


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    settings = Settings.from_env(os.environ).with_cli(parser.parse_args(argv))
    configure_logging(settings.log_level)
    if not settings.api_keys and not settings.allow_anonymous:
        print(
            "gateway: error: no API keys configured. Set IMAGEN_API_KEYS (comma-separated) or IMAGEN_API_KEYS_FILE, "
            "or pass --allow-anonymous for local development.",
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
                log_file=log_dir / "tritonserver.log",
            )
            print(f"gateway: starting Triton (log: {triton.log_file})", flush=True)
            triton.start()
            models = [m for manifest in load_manifests(settings.model_repository).values() for m in manifest.models]
            triton.wait_ready(models, timeout_s=settings.triton_timeout_s)
            print(f"gateway: Triton ready at {triton.grpc_url} (gRPC), {len(models)} models", flush=True)
        asyncio.run(serve(settings))
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
