# Triton Inference Server 2.51 (NGC 24.10), the release of the tritonserver binary bundled with nvidia-pytriton
# 0.7 that the local launcher and the tests use.
#
#   docker build -f docker/triton.Dockerfile -t imagen-triton .        (from the repository root)
#
# The export writes one of three kinds of models (`python -m export --backend ...`):
#   --backend tensorrt     tensorrt_plan models (Triton's built-in TensorRT backend, TensorRT 10.5 in 24.10);
#                          the plans are built on the serving GPU by docker/trt-build.Dockerfile before Triton
#                          starts (compose `--profile tensorrt`, docker/k8s/overlays/gpu-tensorrt).
#   --backend onnxruntime  config.pbtxt for Triton's built-in onnxruntime backend (ONNX Runtime 1.19.2 in 24.10).
#                          Needs nothing beyond the base image. On GPU instances its TensorRT execution provider
#                          builds the engines at load, into /data/trt-cache (writable: see compose.yaml).
#   --backend python       model.py (model_repository/python_backend/model.py) run by Triton's Python backend,
#                          which imports onnxruntime and numpy from the container's own Python: Python 3.10 here
#                          (Ubuntu 22.04), not the 3.11 of .venv-triton. That Python needs onnxruntime(-gpu) and
#                          numpy<2 (the stub exchanges tensors through the numpy 1.x ABI; model.py refuses numpy 2).
#
# requirements/triton-runtime.txt is the source of the numpy pin. Its onnxruntime pin (1.32.0) cannot be used as
# is: onnxruntime and onnxruntime-gpu stopped publishing cp310 wheels after 1.23.2, so this image installs
# ORT_PACKAGE==ORT_VERSION instead (onnxruntime-gpu 1.23.2: CUDA 12 + cuDNN 9, both provided by the base image).
# Build with --build-arg ORT_PACKAGE=onnxruntime for a CPU-only host.
#
# The python backend's torch runtime (`python -m export --runtime torch`) needs PyTorch, diffusers and
# transformers in that Python (requirements/triton-torch.txt): build with --build-arg RUNTIME=torch (TORCH_INDEX
# names the wheel index of the CUDA build; the base image's CUDA 12 driver stack runs it). Without it the image
# stays torch-free.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ARG ORT_PACKAGE=onnxruntime-gpu
ARG ORT_VERSION=1.23.2
ARG RUNTIME=onnxruntime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements/triton-runtime.txt requirements/triton-torch.txt /tmp/requirements/
RUN grep -v '^onnxruntime' /tmp/requirements/triton-runtime.txt > /tmp/requirements/runtime.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/requirements/runtime.txt "${ORT_PACKAGE}==${ORT_VERSION}" \
    && python3 -c "import numpy, onnxruntime; assert numpy.__version__.startswith('1.'), numpy.__version__; print('numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
    && if [ "${RUNTIME}" = torch ]; then \
         python3 -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -r /tmp/requirements/triton-torch.txt \
         && python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__)"; \
       fi \
    && rm -rf /tmp/requirements

# The model repository mount point. /data is owned by uid 10001 (the export and gateway images' user) so that a
# fresh named volume gets that owner even when this image is the first to mount it.
RUN mkdir -p /data/models && chown -R 10001:10001 /data
# The TensorRT cache folder (docker/trt-build.Dockerfile creates it the same way): onnxruntime's TensorRT engine
# cache is written there by Triton itself, the plans' timing cache by the trt-build one-shot (group 10001).
RUN mkdir -p /data/trt-cache && chown 1000:10001 /data/trt-cache && chmod 2775 /data/trt-cache

# Run as the image's unprivileged triton-server user (uid 1000); it only reads the repository.
USER 1000:1000

EXPOSE 8000 8001 8002

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=6 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=4)"]

# The base image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh) is kept; it execs this command.
# poll: models that the export moves into the repository (atomically, manifest last) are loaded within 10 s.
CMD ["tritonserver", "--model-repository=/data/models", "--model-control-mode=poll", "--repository-poll-secs=10"]
