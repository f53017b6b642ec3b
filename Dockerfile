# The one image of moeserve: the operator (`moeserve-operator`) and the Ray head and worker pods
# (`ray start ...`, the Serve application from moeserve.workers) all run it.
#   docker build -t ghcr.io/moeserve/moeserve:0.1.0 .
#
# BASE is any Debian-like image with Python >= 3.11 and its venv module: python:3.11-slim by default;
# the e2e tests build on a debootstrap'ed Debian bookworm (python3 + python3-venv) with buildah
# (tests/controlplane/images.sh). Everything goes into a virtual environment, so both work the same.
ARG BASE=python:3.11-slim

# The dependency list alone, read from pyproject.toml: the install below is cached on this file's
# content, so neither a code change nor an edit elsewhere in pyproject.toml reinstalls torch and ray.
FROM ${BASE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; t = tomllib.load(open('/tmp/pyproject.toml', 'rb')); p = t['project']; \
print('\n'.join(t['build-system']['requires'] + p['dependencies'] \
+ p['optional-dependencies']['ray'] + p['optional-dependencies']['operator']))" >/tmp/requirements.txt

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/venv

# (The wheel cache is a build cache mount, not part of the image.)
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

WORKDIR /opt/moeserve
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY workers ./workers
COPY operator ./operator
# setup.py compiles the CPU kernels of the AVX2 path: a C compiler and Python's headers are needed
# for that step only. A BASE that has them (the e2e tests' base) is used as it is; otherwise they
# come from apt and go again after the install.
RUN set -e; missing=""; \
    command -v gcc >/dev/null || missing="gcc libc6-dev"; \
    python3 -c "import os, sysconfig; os.stat(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
        2>/dev/null || missing="$missing python3-dev"; \
    if [ -n "$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $missing; fi; \
    pip install --no-deps --no-build-isolation . && rm -rf /opt/moeserve/build; \
    python3 -c "from moeserve.workers.kernels import avx2; assert avx2.ext is not None, 'AVX2 kernels not built'"; \
    if [ -n "$missing" ]; then apt-get purge -y --auto-remove $missing && rm -rf /var/lib/apt/lists/*; fi

# Non-root, with a home for Ray's session files (/tmp/ray) and caches.
RUN useradd --create-home --uid 1000 --user-group moeserve
USER 1000:1000
WORKDIR /home/moeserve

CMD ["moeserve-operator", "--help"]
