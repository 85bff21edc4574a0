# CPU image of the gateway: `serving up` on 8000 (HTTP), 9000 (gRPC) and Ray's metrics
# on 8080, with the demo models trained at build time (seeded data, no downloads).
#
#   docker build -t serving:0.1.0 .
#   docker run --rm --network host -e SERVING_REDIS_URL=redis://127.0.0.1:6379/0 serving:0.1.0
#
# Stages: `deps` (the pinned dependencies: rebuilt only when pyproject.toml or
# constraints.txt change), `app` (the project itself, on top), `models` (trains the demo
# registry with the `train` extra, which stays out of the final image) and the runtime.
#
# Build args:
#   BASE_IMAGE       a Python 3.11+ Debian/Ubuntu image with `python3 -m venv`; the
#                    default is python:3.11-slim-bookworm pinned by its multi-platform
#                    index digest (docker buildx imagetools inspect python:3.11-slim-bookworm)
#   TORCH_INDEX_URL  where torch 2.13.0 comes from (PyTorch's CPU-only index by default)
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml constraints.txt ./
# The project's requirements (base plus the `cpu` extra: onnxruntime), read from
# pyproject.toml so that this layer does not depend on the source.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt 'torch==2.13.0' \
    && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["cpu"]))' > requirements.txt \
    && /opt/venv/bin/pip install -c constraints.txt -r requirements.txt

FROM deps AS app
COPY README.md ./
COPY serving ./serving
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/serving --version

FROM app AS models
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["optional-dependencies"]["train"]))' > train.txt \
    && /opt/venv/bin/pip install -c constraints.txt -r train.txt \
    && /opt/venv/bin/serving demo build /app/models \
    && mkdir /app/deployments \
    && mv /app/models/deployment.yaml /app/deployments/local.yaml

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="serving" \
      org.opencontainers.image.description="Low-latency model serving gateway (CPU)"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app SERVING_HTTP_HOST=0.0.0.0
# A numeric user with a passwd entry (Ray asks for the user's name).
RUN groupadd --gid 10001 serving \
    && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin serving
COPY --from=app /opt/venv /opt/venv
COPY --from=models --chown=10001:10001 /app /app
WORKDIR /app
USER 10001:10001
# 8000 HTTP, 9000 gRPC, 8080 Ray's Prometheus endpoint (8081 under SageMaker's `serve`).
EXPOSE 8000 9000 8080
# Healthy once every model version is warm: /readyz on the gateway's own port,
# whatever the platform mode chose (serving health reads the same settings).
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["serving", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["serving"]
CMD ["up"]
