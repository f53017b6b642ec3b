# The one image of moeserve: the operator (`moeserve-operator`) and the Ray head and worker pods
# (`ray start ...`, the Serve application from moeserve.workers) all run it.
#   docker build -t ghcr.io/moeserve/moeserve:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/moeserve
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY workers ./workers
COPY operator ./operator
RUN pip install ".[ray,operator]" && rm -rf /opt/moeserve/build

# Non-root, with a home for Ray's session files (/tmp/ray) and caches.
RUN useradd --create-home --uid 1000 --user-group moeserve
USER 1000:1000
WORKDIR /home/moeserve

CMD ["moeserve-operator", "--help"]
