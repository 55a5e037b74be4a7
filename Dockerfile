# syntax=docker/dockerfile:1
# API instance image (linux/amd64). Two stages: wheels are fetched in the first,
# installed from a bind mount in the second, so neither they nor pip's cache
# become a layer of the final image.

FROM python:3.11-slim AS wheels
WORKDIR /build
COPY requirements.txt .
# Binary wheels only: every runtime dependency ships one for cp311/x86_64, so no
# compiler is needed here either (a missing wheel fails the build loudly).
RUN pip wheel --no-cache-dir --disable-pip-version-check --only-binary :all: \
        --wheel-dir /build/wheels -r requirements.txt

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/build,target=/build \
    pip install --no-cache-dir --no-index --find-links /build/wheels -r /build/requirements.txt
# Non-root user. /sockets is created owned by it: an empty named volume mounted
# there is seeded with this ownership, so the instances can create their sockets.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -m 0755 /sockets && chown app:app /sockets
WORKDIR /app
# Only the modules server.py imports (tests/test_deploy_config.py checks the list), and the
# page GET /dashboard serves.
# Root-owned: the app user can read the code but not change it.
COPY audit.py config.py observe.py payment_request.py payments.py peer.py processors.py router.py server.py store.py \
     timestamps.py dashboard.html ./
USER app
CMD ["python", "server.py"]
