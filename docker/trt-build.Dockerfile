# The TensorRT plan builder: `scripts/build-trt-plans.sh` (python -m export.trt_build, standard library only)
# running trtexec in NVIDIA's TensorRT container of the same NGC release as the Triton image (24.10: TensorRT
# 10.5). A plan only loads in the TensorRT version and on the GPU architecture it was built with, so it is built
# on the GPU that serves it, before Triton starts: the compose one-shot `trt-build` (profile `tensorrt`) and the
# init container of docker/k8s/overlays/gpu-tensorrt.
#
#   docker build -f docker/trt-build.Dockerfile -t imagen-trt-build:24.10 .        (from the repository root)
#   docker run --rm --gpus 1 -v imagen_models:/data imagen-trt-build:24.10 --dry-run
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
FROM ${TENSORRT_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/usr/src/tensorrt/bin:${PATH}

WORKDIR /app
COPY export/__init__.py export/trt_build.py export/
COPY scripts/build-trt-plans.sh scripts/

# /data as in the export image (uid 10001). /data/trt-cache is the TensorRT cache folder: group 10001, setgid,
# group-writable, so that Triton (uid 1000, group 10001 added) writes onnxruntime's engine cache beside the
# timing cache this writes; a fresh volume mounted there takes this owner and mode.
RUN mkdir -p /data/models /data/trt-cache \
    && chown 10001:10001 /data /data/models \
    && chown 1000:10001 /data/trt-cache && chmod 2775 /data/trt-cache

# The export's user: it owns the model folders the plans are written into.
USER 10001:10001

ENTRYPOINT ["/app/scripts/build-trt-plans.sh", "--repository", "/data/models"]
CMD []
