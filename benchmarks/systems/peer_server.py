"""A minimal one-request-at-a-time HTTP endpoint around a whole pipeline, the way most self-hosted servers run.

`python -m benchmarks.systems.peer_server --kind torch|ort --model-dir DIR --manifest M --port P --threads T`
  torch: diffusers `StableDiffusionImg2ImgPipeline` (CPU) on the diffusers folder;
  ort:   optimum `ORTStableDiffusionImg2ImgPipeline` on the optimum-layout folder (the Triton repository's ONNX).
It accepts the service's JSON body (POST /v1/image-to-image), resizes the image exactly as the gateway does
(`gateway.codecs`), runs the pipeline, and answers `{"images": [{"b64_png": ...}]}`. A single-threaded stdlib
server with HTTP/1.0 (one connection per request): concurrent clients wait in the accept queue, FIFO.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import sys
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from benchmarks.pinning import ort_session_options, pin_torch


def load(kind: str, model_dir: Path, threads: int) -> Any:
    warnings.filterwarnings("ignore")
    for name in ("optimum", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pin_torch(threads)
    if kind == "torch":
        import diffusers

        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
            model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
        )
    else:
        from optimum.onnxruntime import ORTStableDiffusionImg2ImgPipeline

        pipe = ORTStableDiffusionImg2ImgPipeline.from_pretrained(
            model_dir, session_options=ort_session_options(threads)
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_handler(pipe: Any, native: int, grid: int) -> type[BaseHTTPRequestHandler]:
    import numpy as np
    import torch
    from PIL import Image

    from gateway.media import codecs

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200, {"status": "ok"})

        def do_POST(self) -> None:
            try:
                req = json.loads(self.rfile.read(int(self.headers["content-length"])))
                source = codecs.parse_image_field(req["image"])
                image = codecs.decode_image(source.data)
                size = codecs.fit_to_grid(image.width, image.height, native, grid)
                image = image.resize(size, resample=Image.Resampling.LANCZOS)
                generator = torch.Generator().manual_seed(int(req.get("seed", 0)))
                out = pipe(
                    prompt=req["prompt"],
                    negative_prompt=req.get("negative_prompt") or None,
                    image=image,
                    strength=float(req["strength"]),
                    num_inference_steps=int(req["steps"]),
                    guidance_scale=float(req["guidance_scale"]),
                    num_images_per_prompt=int(req.get("num_images", 1)),
                    generator=generator,
                    output_type="np",
                )
                images = []
                for array in np.asarray(out.images):
                    buffer = io.BytesIO()
                    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
                    images.append({"b64_png": base64.b64encode(buffer.getvalue()).decode("ascii")})
                self._reply(200, {"images": images})
            except Exception as exc:
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    return Handler


class Server(HTTPServer):
    request_queue_size = 256  # concurrent clients queue in the kernel, as with any one-worker server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.systems.peer_server")
    parser.add_argument("--kind", choices=("torch", "ort"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="the Triton pipeline manifest (grid, size)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    manifest = json.loads(args.manifest.read_text())
    pipe = load(args.kind, args.model_dir, args.threads)
    server = Server(("127.0.0.1", args.port), make_handler(pipe, manifest["native_resolution"], manifest["grid"]))
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
