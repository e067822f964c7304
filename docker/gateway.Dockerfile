# The HTTP gateway: Starlette + uvicorn, talking gRPC to an external Triton.
# Serving dependencies only (requirements/serve.txt): no torch, diffusers, transformers or optimum.
#
#   docker build -f docker/gateway.Dockerfile -t imagen-gateway .      (from the repository root)
#
# It reads the pipeline manifests and tokenizer.json files from the model repository, so the folder Triton serves
# must be mounted here too (read-only) at IMAGEN_MODEL_REPOSITORY. The repository sits one level below the mount
# point (/data/models, not /data): see docs/deployment.md, "Why /data/models".
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGEN_HOST=0.0.0.0 \
    IMAGEN_PORT=8080 \
    IMAGEN_TRITON_URL=triton:8001 \
    IMAGEN_EXPORT_DEMO=0 \
    IMAGEN_MODEL_REPOSITORY=/data/models \
    IMAGEN_STORAGE_DIR=/var/lib/imagen/images \
    IMAGEN_JOBS_DB=/var/lib/imagen/jobs/jobs.sqlite3

# The service user, and the mount points it needs. uid 10001 owns /data (so a fresh named volume mounted there is
# created with that owner, whichever image mounts it first), the image store and the SQLite job store's folder
# (the database, its -wal/-shm files and the generated webhook secret when IMAGEN_WEBHOOK_SECRET is unset).
# Mount volumes at these folders: a fresh named volume copies the folder's owner, so uid 10001 can write to it.
RUN groupadd --system --gid 10001 imagen \
    && useradd --system --uid 10001 --gid imagen --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin imagen \
    && mkdir -p /data/models /var/lib/imagen/images /var/lib/imagen/jobs \
    && chown -R imagen:imagen /data /var/lib/imagen

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the pins change.
COPY requirements/serve.txt requirements/serve.txt
RUN pip install --no-cache-dir -r requirements/serve.txt

# Then the code (owned by root: the service cannot modify it), byte-compiled at build time.
COPY gateway/ gateway/
RUN python -m compileall -q gateway

USER 10001:10001
EXPOSE 8080

# Liveness only (/healthz answers without touching Triton); /readyz tells whether the pipelines' models are ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('IMAGEN_PORT', '8080'), timeout=4)"]

# Every setting comes from the environment (the ENV defaults above; compose and Kubernetes override them), so
# nothing on the command line shadows IMAGEN_TRITON_URL or IMAGEN_HOST. `--workers N` / IMAGEN_WORKERS=N runs N
# processes (PostgreSQL job store only).
CMD ["python", "-m", "gateway"]
