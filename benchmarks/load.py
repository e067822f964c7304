"""`python -m benchmarks load --url URL`: the harness's load generator against any running service of this API.

A closed-loop concurrency sweep and open-loop Poisson runs at chosen rates (`benchmarks.loadgen`, the same code the
harness drives), against a deployment local or remote, with a progress bar; writes JSON, markdown and plots
(`benchmarks.report.write_load`). Failures to start (unreachable URL, a refused key, an unknown model, an image file
that is not an image, a warm-up request the service rejects) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks import pinning
from benchmarks.config import RESULTS_DIR, Workload

ENDPOINT_PATH = "/v1/image-to-image"
EXIT_USAGE = 2
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


class LoadError(Exception):
    """A reason not to (or no longer) run: printed as one line, exit status 2."""


def _numbers(text: str, kind: type, what: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what}: every value must be > 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    wl = Workload()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks load",
        description="Load-test a running image-to-image service: closed-loop concurrency sweep + open-loop Poisson.",
    )
    p.add_argument("--url", required=True, help="service base URL (http://host:port[/prefix]) or its endpoint URL")
    p.add_argument("--key", default=os.environ.get("IMAGEN_API_KEY"), help="API key, sent as a Bearer token "
                   "(default: $IMAGEN_API_KEY; none: no Authorization header)")  # fmt: skip
    p.add_argument("--model", help="model id (default: the service's default from GET /v1/models)")
    p.add_argument("--image", type=Path, help="input image file (default: the harness's 512x512 PNG)")
    p.add_argument("--concurrency", type=lambda s: _numbers(s, int, "--concurrency"), default=[1, 2, 4, 8],
                   help="closed-loop levels (default 1,2,4,8)")  # fmt: skip
    p.add_argument("--rates", type=lambda s: _numbers(s, float, "--rates"), default=[1.0, 2.0],
                   help="open-loop Poisson rates, requests/s (default 1,2; '' for none)")  # fmt: skip
    p.add_argument("--requests", type=int, default=32, help="measured requests per run (default 32)")
    p.add_argument("--repeats", type=int, default=1, help="runs per level and rate; figures are medians (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests before measuring, never counted (>= 1)")
    p.add_argument("--slo-ms", type=float, help="latency target: the share of requests within it is reported")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "load", help="results folder")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per-request timeout (default 900)")
    p.add_argument("--prompt", default=wl.prompt)
    p.add_argument("--negative-prompt", default=wl.negative_prompt)
    p.add_argument("--steps", type=int, default=wl.steps)
    p.add_argument("--strength", type=float, default=wl.strength)
    p.add_argument("--guidance-scale", type=float, default=wl.guidance_scale)
    p.add_argument("--seed", type=int, default=wl.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.concurrency and not args.rates:
        p.error("nothing to run: give --concurrency and/or --rates")
    for name in ("requests", "repeats", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.slo_ms is not None and not args.slo_ms > 0:
        p.error("--slo-ms must be > 0")
    if not args.timeout_s > 0:
        p.error("--timeout-s must be > 0")
    return args


def endpoints(url: str) -> tuple[str, str]:
    """(base URL, endpoint URL) from either one."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise LoadError(f"--url {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise LoadError(f"--url {url!r} must be an http:// or https:// URL with a host")
    text = str(parsed.copy_with(query=None, fragment=None)).rstrip("/")
    if text.endswith(ENDPOINT_PATH):
        return text[: -len(ENDPOINT_PATH)], text
    return text, text + ENDPOINT_PATH


def read_image(path: Path | None) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes, checked to be an image the API takes, and what it is."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        from benchmarks.workload import input_image, png_bytes

        data = png_bytes(input_image(Workload().image_side))
        source = "generated (benchmarks.workload.input_image)"
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoadError(f"cannot read --image {path}: {exc.strerror or exc}") from None
        source = str(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "", img.size
            img.verify()
    except UnidentifiedImageError:
        raise LoadError(f"--image {path} is not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"--image {path} is not a readable image: {' '.join(str(exc).split())[:200]}") from None
    if fmt not in MIME:
        raise LoadError(f"--image {path} is {fmt or 'an unknown format'}; the API takes {', '.join(MIME)}")
    return data, {"source": source, "format": fmt, "width": width, "height": height, "bytes": len(data)}


def _error_text(response: httpx.Response) -> str:
    try:
        err = response.json().get("error", {})
        text = f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except (ValueError, AttributeError):
        text = response.text[:200]
    return " ".join(f"{response.status_code} {text}".split())


def preflight(base: str, headers: dict[str, str], model: str | None, timeout_s: float) -> dict[str, Any]:
    """GET /v1/models: reachable, the key accepted, the model served. A service without the route is let through."""
    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=min(timeout_s, 30.0))
    except httpx.HTTPError as exc:
        raise LoadError(f"cannot reach {base}: {type(exc).__name__}: {exc}") from None
    if response.status_code in (401, 403):
        hint = "" if "authorization" in headers else " (no --key given)"
        raise LoadError(f"{base} refused the API key{hint}: {_error_text(response)}")
    if response.status_code == 404:
        return {"model": model, "served_models": None}
    if response.status_code != 200:
        raise LoadError(f"GET {base}/v1/models answered {_error_text(response)}")
    try:
        listing = response.json()
        served = [str(m["id"]) for m in listing.get("data", [])]
        default = listing.get("default")
    except (ValueError, AttributeError, KeyError, TypeError):
        raise LoadError(f"GET {base}/v1/models did not answer a model list (is this the image-to-image API?)") from None
    if model is not None and served and model not in served:
        raise LoadError(f"model {model!r} is not served by {base} (it serves: {', '.join(served)})")
    if model is None and served:
        model = default if default in served else served[0]
    return {"model": model, "served_models": served}


def request_body(args: argparse.Namespace, model: str | None, data: bytes, fmt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}",
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "strength": args.strength,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "num_images": 1,
        "cache": False,  # every request runs the model: the exact-result cache would answer the repeats
    }
    if model is not None:
        body["model"] = model
    return body


def summarize(result: dict[str, Any], statuses: Counter[str], requests: int, slo_ms: float | None) -> dict[str, Any]:
    """One run -> throughput, latency percentiles (seconds, over successful requests) and the SLO share."""
    import numpy as np

    lat = np.asarray(result["latencies_s"], dtype=float)
    wall = result["wall_s"]

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if lat.size else None

    out = {
        "requests": requests,
        "completed": result["completed"],
        "errors": result["errors"],
        "images_per_s": result["completed"] / wall if wall > 0 else 0.0,
        "requests_per_s": requests / wall if wall > 0 else 0.0,
        "p50_s": pct(50),
        "p95_s": pct(95),
        "p99_s": pct(99),
        "mean_s": float(lat.mean()) if lat.size else None,
        "wall_s": wall,
        "status_counts": dict(sorted(statuses.items())),
        "error_samples": result.get("error_samples", []),
        "latencies_s": result["latencies_s"],
    }
    if slo_ms is not None:
        met = int((lat * 1e3 <= slo_ms).sum())
        out["slo_met"] = met
        out["slo_met_share"] = met / requests if requests else None  # failed requests count as misses
    return out


class Bar:
    """tqdm over every measured request, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", dynamic_ncols=True, file=sys.stderr)
        self.errors = 0

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def done(self, ok: bool) -> None:
        self.errors += 0 if ok else 1
        if self.bar is not None:
            self.bar.update(1)
            if not ok:
                self.bar.set_postfix(errors=self.errors)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def sweep(
    args: argparse.Namespace, endpoint: str, body: bytes, headers: dict[str, str], bar: Bar
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from benchmarks import loadgen

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"closed": {}, "open": {}}

    def counter(statuses: Counter[str]) -> loadgen.OnDone:
        def on_done(ok: bool, latency: float | None, status: int | None) -> None:
            statuses[str(status) if status is not None else "no response"] += 1
            bar.done(ok)

        return on_done

    # Warm-up (not counted): the service must answer it, or nothing measured would mean anything.
    bar.describe("warm-up")
    warm = await loadgen.closed_loop(
        endpoint, body, 1, args.warmup, headers=headers, on_done=counter(Counter()), timeout_s=args.timeout_s
    )
    if warm["completed"] == 0:
        sample = warm["error_samples"][0] if warm["error_samples"] else "no answer"
        raise LoadError(f"warm-up request to {endpoint} failed: {' '.join(sample.split())[:300]}")

    for c in args.concurrency:
        for r in range(args.repeats):
            bar.describe(f"closed c={c} ({r + 1}/{args.repeats})")
            statuses: Counter[str] = Counter()
            n = max(args.requests, c)
            raw = await loadgen.closed_loop(
                endpoint, body, c, n, headers=headers, on_done=counter(statuses), timeout_s=args.timeout_s
            )
            run = summarize(raw, statuses, n, args.slo_ms)
            run["concurrency"] = c
            runs["closed"].setdefault(str(c), []).append(run)
            bar.write(_line(f"closed c={c}", run))
    for rate in args.rates:
        for r in range(args.repeats):
            bar.describe(f"open {rate:g}/s ({r + 1}/{args.repeats})")
            statuses = Counter()
            raw = await loadgen.open_loop(
                endpoint, body, rate, args.requests, 1 + r, headers=headers, on_done=counter(statuses),
                timeout_s=args.timeout_s,
            )  # fmt: skip
            run = summarize(raw, statuses, args.requests, args.slo_ms)
            run["rate_per_s"] = rate
            runs["open"].setdefault(f"{rate:g}", []).append(run)
            bar.write(_line(f"open {rate:g} req/s", run))
    return runs


def _line(label: str, run: dict[str, Any]) -> str:
    p50 = "-" if run["p50_s"] is None else f"{run['p50_s'] * 1e3:.0f}"
    p99 = "-" if run["p99_s"] is None else f"{run['p99_s'] * 1e3:.0f}"
    slo = f", {run['slo_met_share'] * 100:.0f}% within SLO" if run.get("slo_met_share") is not None else ""
    return f"{label}: {run['images_per_s']:.2f} images/s, p50 {p50} ms, p99 {p99} ms, errors {run['errors']}{slo}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    base, endpoint = endpoints(args.url)
    data, image = read_image(args.image)
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    target = preflight(base, headers, args.model, args.timeout_s)
    body_obj = request_body(args, target["model"], data, image["format"])
    body = json.dumps(body_obj).encode()
    began = time.time()
    total = args.warmup + args.repeats * (
        sum(max(args.requests, c) for c in args.concurrency) + args.requests * len(args.rates)
    )
    bar = Bar(total, enabled=not args.no_progress)
    try:
        runs = asyncio.run(sweep(args, endpoint, body, headers, bar))
    finally:
        bar.close()
    return {
        "kind": "load",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "duration_s": time.time() - began,
        "target": {"url": base, "endpoint": endpoint, **target, "authenticated": bool(args.key)},
        "client": pinning.host_facts(),
        "config": {
            "concurrency": args.concurrency,
            "rates": args.rates,
            "requests": args.requests,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "slo_ms": args.slo_ms,
            "timeout_s": args.timeout_s,
            "loop": "closed: each of C workers sends its next request when its previous one returns; open: Poisson "
            "arrivals, latency counted from the scheduled arrival (no coordinated omission)",
        },
        "request": {
            **{k: v for k, v in body_obj.items() if k != "image"},
            "image": image,
            "body_bytes": len(body),
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
        from benchmarks import report

        written = report.write_load(results, args.output)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the output folder, mostly
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    summary = results["summary"]
    if summary["errors"]:
        print(f"warning: {summary['errors']} of {summary['requests']} measured requests failed", file=sys.stderr)
    print()
    print(report.load_markdown(results, {k: str(v) for k, v in written.items() if k not in ("json", "markdown")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
