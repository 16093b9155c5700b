# syntax=docker/dockerfile:1
# canpipe in one image; the command picks the role: serve (the default), consume, aggregate --schedule, check.
# docker build -t canpipe .   (docs/deployment.md; compose.yaml runs the whole pipeline)
ARG PYTHON=3.11

# --- builder: compiles the kernels into the canpipe wheel and gathers every dependency as a wheel ---------
FROM python:${PYTHON}-slim-bookworm AS builder
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE ./
COPY ext ext
COPY engine engine
ARG EXTRAS=sqs
# a kernel that does not compile fails the build here, instead of shipping the pure-Python twins
ENV CANPIPE_REQUIRE_COMPILED=1
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

# --- runtime: the wheels only; no compiler, no sources, not root ------------------------------------------
FROM python:${PYTHON}-slim-bookworm AS runtime
ARG EXTRAS=sqs
RUN groupadd --system --gid 10001 canpipe \
    && useradd --system --uid 10001 --gid canpipe --home-dir /data --no-create-home --shell /usr/sbin/nologin canpipe \
    && install --directory --owner canpipe --group canpipe --mode 0750 /data
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "canpipe[${EXTRAS}]"
# the image was built with its kernels: `canpipe check` and the daemons' start-up fail if they are missing
ENV CANPIPE_DATA_DIR=/data \
    CANPIPE_REQUIRE_COMPILED=1 \
    CANPIPE_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER canpipe:canpipe
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# the receiver's /health (its queue answers); compose turns it off for consumers and the aggregator
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('CANPIPE_HEALTH_URL', 'http://127.0.0.1:8000/health'), timeout=4)"]
ENTRYPOINT ["canpipe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
