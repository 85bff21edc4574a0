# CPU image: installs the pinned dependencies, trains the demo models at build time
# (from bundled / seeded data, no downloads) and runs `serving up` as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SERVING_HTTP_HOST=0.0.0.0
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 serving
WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
COPY serving ./serving
COPY models ./models
COPY deployments ./deployments
RUN pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0' \
    && pip install -c constraints.txt '.[train,cpu]' \
    && python -m models.build \
    && chown -R serving:serving /app

USER serving
EXPOSE 8000 9000
ENTRYPOINT ["serving"]
CMD ["up"]
