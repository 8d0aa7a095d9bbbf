# mnist-serve: FastAPI on onnxruntime, serving models/<name>.onnx. No TensorFlow in here.
#
#   docker build -t mnist-serve:local .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8081:8081 --read-only --tmpfs /tmp mnist-serve:local
#
# HTTP (/v1, /v2 REST, the probes, /metrics) on 8000; the Open Inference Protocol over gRPC on 8081.
#
# Two stages: the build stage resolves and installs `.[serve]` into a virtual environment; the runtime stage
# copies only that environment and the model files onto a fresh base, so pip caches, build backends and the
# source tree never reach the final image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# binutils' strip, for the debug sections some wheels ship (uvloop alone carries 11 MB). Build stage only, so
# the version is left to the base image's Debian release rather than pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, read from pyproject.toml and installed at the versions the lock (constraints.txt, `make lock`)
# names: the image gets the versions CI tested. This layer stays cached while only the code changes.
# Then what inference never loads goes: test suites, onnxruntime's offline tools (quantization, transformer
# optimizers) and debug sections, about 40 MB. numpy and Pillow keep theirs: their bundled libraries were
# rewritten by auditwheel's patchelf, and strip leaves such files unloadable. The import proves the rest loads.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > requirements.txt \
 && pip install --constraint constraints.txt --requirement requirements.txt \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" "$site/onnxruntime/tools" \
 && find "$site" -depth -type d -name tests -exec rm -rf {} + \
 && find "$site" -type f -name '*.so*' -not -path '*.libs/*' -not -path "$site/numpy/*" -not -path "$site/PIL/*" \
      -exec strip --strip-debug {} + \
 && python -c "import numpy, onnxruntime, PIL.Image, fastapi, uvicorn, uvloop, httptools, yaml, watchfiles, pydantic_core, grpc, google.protobuf"

# Then the package itself, without touching the dependencies resolved above. The package metadata reads the
# README and carries the LICENSE; "README.md*" (with a file that is always there) tolerates a checkout without one.
COPY pyproject.toml README.md* LICENSE ./
COPY service/ service/
RUN test -f README.md || echo "mnist-serve" > README.md \
 && pip install --no-deps . \
 && pip uninstall --yes pip setuptools \
 && mnist-serve --help > /dev/null

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="mnist-serve" \
      org.opencontainers.image.description="Handwritten-digit recognition over HTTP and gRPC: FastAPI on onnxruntime" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 mnist \
 && useradd --system --uid 10001 --gid mnist --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mnist
COPY --from=build /opt/venv /opt/venv
# Owned by root and read-only for the service user: the service never writes to disk.
COPY models/ /app/models/
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MNIST_SERVE_HOST=0.0.0.0 \
    MNIST_SERVE_PORT=8000 \
    MNIST_SERVE_GRPC_PORT=8081 \
    MNIST_SERVE_MODEL_DIR=/app/models
USER 10001:10001
EXPOSE 8000 8081
# Slim images carry no curl; the interpreter that is already here does the probe. Ready means loaded and warmed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MNIST_SERVE_PORT', '8000'), timeout=2)"]
CMD ["mnist-serve"]
