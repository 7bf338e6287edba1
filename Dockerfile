# syntax=docker/dockerfile:1
# The image the manifests in deploy/ run: Ray's own image of the Ray version that pyproject.toml
# pins, plus this package (without dev extras). One Dockerfile, two variants, each built from pinned
# inputs only (deploy/README.md, "Build the image", reads the digests and hashes these need):
#   docker build --build-arg VARIANT=cpu --build-arg BASE_DIGEST=sha256:... \
#     --build-arg TORCH_CPU_SHA256=... --build-arg TORCHVISION_CPU_SHA256=... -t gan-job:2.60.0-cpu .
#   docker build --build-arg VARIANT=gpu --build-arg BASE_DIGEST=sha256:... -t gan-job:2.60.0-gpu .
# The tag is <Ray version>-<variant>; tests/test_deploy.py checks that RAY_VERSION, the pin in
# pyproject.toml, every rayVersion and every image tag in deploy/ agree.

# Must equal the "ray[default,train]==X" pin in pyproject.toml.
ARG RAY_VERSION=2.60.0
# cpu: Ray's CPU image and CPU-only torch wheels (small); gpu: Ray's CUDA image and torch's CUDA wheels.
ARG VARIANT=cpu
# The digest of rayproject/ray:<RAY_VERSION>-py311-<VARIANT>: a tag can be moved to other content, a
# digest cannot. One per variant, and no default, so that the build stops at FROM without it:
#   docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cpu --format '{{.Manifest.Digest}}'
ARG BASE_DIGEST

FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}@${BASE_DIGEST}
ARG VARIANT
# The torch release CI tests with, and the torchvision built for it (each torchvision release pins one
# torch). The gpu variant installs both from deploy/image/requirements-gpu.txt at these versions.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# cpu only: the sha256 of PyTorch's CPU wheels of those versions (CPython 3.11, Linux), which only
# PyTorch's own index serves. No default: the build stops without them (deploy/README.md reads them).
ARG TORCH_CPU_SHA256
ARG TORCHVISION_CPU_SHA256

# Ray's images run as "ray" (uid 1000, group users = gid 100), who owns the Python env, so pip
# needs no root. Numeric, so that Kubernetes can verify runAsNonRoot.
USER 1000:100
WORKDIR /home/ray

# One layer: this package and its dependencies. Ray is in the base image at the pinned version,
# so pip keeps it. The source comes in through a bind mount (.dockerignore lets only
# pyproject.toml, README.md, gan/, job/ and the requirements files through) and is built in a
# scratch copy that is gone before the layer is written: no source, data or secrets stay in the image.
# Every download is checked against a committed or given sha256 (--require-hashes), and each comes
# from one index: no --extra-index-url, under which a package of the same name on either index could
# win. The cpu variant takes torch and torchvision alone from PyTorch's CPU index (PyPI's Linux builds
# are the CUDA ones), without their dependencies, which come hash-pinned from PyPI like the rest.
# pip reads its command line only (--isolated, no config file): settings inherited from the base image
# cannot add an index. Wheels only (--only-binary): building an sdist would fetch its build tools
# unchecked. This package itself is built offline with the setuptools that requirements.txt pins.
RUN --mount=type=bind,target=/tmp/context \
    export PIP_CONFIG_FILE=/dev/null \
    && cp -r /tmp/context /tmp/src \
    && if [ "${VARIANT}" = "cpu" ]; then \
        printf 'torch==%s+cpu --hash=sha256:%s\ntorchvision==%s+cpu --hash=sha256:%s\n' \
            "${TORCH_VERSION}" "${TORCH_CPU_SHA256:?is required for VARIANT=cpu: see deploy/README.md}" \
            "${TORCHVISION_VERSION}" "${TORCHVISION_CPU_SHA256:?is required for VARIANT=cpu: see deploy/README.md}" \
            > /tmp/src/torch-cpu.txt \
        && pip install --isolated --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
            --index-url https://download.pytorch.org/whl/cpu -r /tmp/src/torch-cpu.txt \
        && pip install --isolated --no-cache-dir --require-hashes --only-binary=:all: \
            --index-url https://pypi.org/simple -r /tmp/src/deploy/image/requirements.txt; \
    else \
        pip install --isolated --no-cache-dir --require-hashes --only-binary=:all: \
            --index-url https://pypi.org/simple -r /tmp/src/deploy/image/requirements.txt \
            -r /tmp/src/deploy/image/requirements-gpu.txt; \
    fi \
    && pip install --isolated --no-cache-dir --no-index --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import gan.models, job.cli"

# Kubernetes (KubeRay's probes, the Job controller) owns health checks; the image runs batch jobs.
HEALTHCHECK NONE
