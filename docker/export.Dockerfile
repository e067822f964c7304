# The exporter: `python -m export` turns a diffusers folder (or `--tiny` random weights) into a Triton model
# repository. torch, diffusers, optimum and onnxruntime live here, never in the gateway image.
#
#   docker build -f docker/export.Dockerfile -t imagen-export .        (from the repository root)
#   docker run --rm -v imagen_models:/data imagen-export --tiny
#   docker run --rm -v imagen_models:/data -v /path/to/sd15:/src:ro imagen-export --model-dir /src --fp16
#
# Output goes to /data/models by default. The exporter stages each pipeline in a folder *beside* the repository
# and moves it in with renames, so the volume must be mounted one level above the repository (/data), never at
# the repository itself: see docs/deployment.md, "Why /data/models".
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1

# Same uid as the gateway image: it owns /data, so a fresh named volume mounted there is writable by the export.
RUN groupadd --system --gid 10001 imagen \
    && useradd --system --uid 10001 --gid imagen --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin imagen \
    && mkdir -p /data/models \
    && chown -R imagen:imagen /data

WORKDIR /app

# torch first, in its own layer (the largest and the slowest to change), from the PyTorch CPU index: the plain
# PyPI wheel of the same version is the CUDA build and pulls several GB of nvidia-* wheels.
# The export traces and converts on the CPU (fp16 conversion included), so the CPU wheel is all it needs. A GPU
# export image would pass e.g. --build-arg TORCH_VARIANT=cu128 (a CUDA variant the PyTorch index publishes for
# this torch version) to get the CUDA wheel; it only pays off once the export code moves tracing onto the GPU.
# TORCH_VERSION must match the pin in requirements/export.txt: the next RUN fails loudly if it does not.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
RUN pip install --no-cache-dir --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}+${TORCH_VARIANT}"

# The rest of the export pins (the torch spec is repeated so pip keeps the wheel above), then the --no-deps
# wheels. Of requirements/no-deps.txt only open-clip-torch is needed here (the real CLIP vocabulary for --tiny);
# nvidia-pytriton (~145 MB: the bundled tritonserver binary) is for the local launcher and tests, and the
# export never uses it.
COPY requirements/export.txt requirements/no-deps.txt requirements/
RUN pip install --no-cache-dir -r requirements/export.txt "torch==${TORCH_VERSION}+${TORCH_VARIANT}" \
    && grep -v '^nvidia-pytriton' requirements/no-deps.txt > /tmp/no-deps.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/no-deps.txt \
    && rm /tmp/no-deps.txt

# The code last. model_repository/ holds python_backend/model.py, copied into every `--backend python` model
# (the generated model_repository/models/ is excluded by .dockerignore).
COPY model_repository/ model_repository/
COPY export/ export/
RUN python -m compileall -q export model_repository

USER 10001:10001

# Arguments given to `docker run` / `docker compose run` replace CMD and are appended to the ENTRYPOINT;
# a later --output overrides the default one (argparse keeps the last).
ENTRYPOINT ["python", "-m", "export", "--output", "/data/models"]
CMD ["--tiny"]
