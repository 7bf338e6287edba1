# syntax=docker/dockerfile:1
# The image the manifests in deploy/ run: Ray's own image of the Ray version that pyproject.toml
# pins, plus this package (without dev extras). One Dockerfile, two variants:
#   docker build --build-arg VARIANT=cpu -t gan-job:2.60.0-cpu .
#   docker build --build-arg VARIANT=gpu -t gan-job:2.60.0-gpu .
# The tag is <Ray version>-<variant>; tests/test_deploy.py checks that RAY_VERSION, the pin in
# pyproject.toml, every rayVersion and every image tag in deploy/ agree.

# Must equal the "ray[default,train]==X" pin in pyproject.toml.
ARG RAY_VERSION=2.60.0
# cpu: Ray's CPU image and CPU-only torch wheels (small); gpu: Ray's CUDA image and torch's CUDA wheels.
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
ARG VARIANT
# The torch release CI tests with; torchvision follows it (each torchvision release pins one torch).
ARG TORCH_VERSION=2.14.1

# Ray's images run as "ray" (uid 1000, group users = gid 100), who owns the Python env, so pip
# needs no root. Numeric, so that Kubernetes can verify runAsNonRoot.
USER 1000:100
WORKDIR /home/ray

# One layer: this package and its dependencies. Ray is in the base image at the pinned version,
# so pip keeps it. The source comes in through a bind mount (.dockerignore lets only
# pyproject.toml, README.md, gan/ and job/ through) and is built in a scratch copy that is gone
# before the layer is written: no source, data or secrets stay in the image.
RUN --mount=type=bind,target=/tmp/context \
    cp -r /tmp/context /tmp/src \
    && if [ "${VARIANT}" = "cpu" ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import gan.models, job.cli"

# Kubernetes (KubeRay's probes, the Job controller) owns health checks; the image runs batch jobs.
HEALTHCHECK NONE
