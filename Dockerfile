# hubconv GitHub Action image (runs as root; `runs.image: Dockerfile` in action.yml builds it on the runner).
#
# BASE_IMAGE: any Debian-like image with Python 3.11 and pip (default the official slim image; local builds
# without a registry use a debootstrapped Debian bookworm with python3 + python3-pip, see scripts/verify-image.sh).
# TORCH_SPEC: pip arguments that install torch first. The default pulls the CPU build from the PyTorch CPU index
# (a few hundred MB instead of GBs of CUDA wheels); offline / mirrored builds pass e.g.
#   --build-arg TORCH_SPEC="torch==2.13.0+cpu --find-links /wheels"   (with the wheel folder mounted there).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

# PIP_BREAK_SYSTEM_PACKAGES: a Debian base's python3 is "externally managed" (PEP 668); this image is single-purpose,
# so pip installs into the system interpreter (-> /usr/local/bin/hubconv on both kinds of base).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# git: release provenance (commit / tag) when the workspace is a checkout. ca-certificates only when the base lacks
# it (both default bases have it; upgrading it in place would fail when a build mounts its own CA bundle over
# /etc/ssl/certs/ca-certificates.crt, as offline / proxied builds do).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git \
        $(dpkg-query -W -f='${Status}' ca-certificates 2>/dev/null | grep -q 'ok installed' || echo ca-certificates) \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# The build context has no .git: setuptools-scm then reports pyproject.toml's fallback_version, unless this names the
# version (the release workflow passes the git tag's; an ARG is in the environment of the RUN steps below).
ARG SETUPTOOLS_SCM_PRETEND_VERSION_FOR_HUBCONV=""
COPY pyproject.toml README.md LICENSE /tmp/hubconv-src/
COPY docker/constraints.txt /tmp/hubconv-src/docker/
COPY hubconv /tmp/hubconv-src/hubconv
# torch first (so the CPU build satisfies the package's torch requirement), then hubconv with the fsspec backends
# for checkpoint URLs (extra "remote": https, s3, gs) and every dependency at the exact version of
# docker/constraints.txt (scripts/lock-image.sh); the sources and pip's build leftovers are removed in the same layer.
RUN python3 -m pip install ${TORCH_SPEC} \
    && python3 -m pip install -c /tmp/hubconv-src/docker/constraints.txt "/tmp/hubconv-src[remote]" \
    && rm -rf /tmp/hubconv-src /root/.cache \
    && /usr/local/bin/hubconv --version \
    && python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

ENTRYPOINT ["/usr/local/bin/hubconv", "action"]
