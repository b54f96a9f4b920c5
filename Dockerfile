# syntax=docker/dockerfile:1
# sluice worker image, used by docker-compose.yml (service `worker`).
#   docker compose up --build worker
# Stage 1 builds the release binary; stage 2 is a slim Debian with ONNX Runtime's shared library,
# taken from the `onnxruntime` PyPI wheel (sluice loads it at run time through ORT_DYLIB_PATH).
# Needs BuildKit (the default builder of Docker 23+) for the cache mounts.

FROM rust:1-bookworm AS builder
WORKDIR /build
COPY . .
# The cache mounts keep the crate registry and target/ between builds; the binary is copied out of
# the mounted target/ because the mount is gone once this step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --bin sluice \
 && cp target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
ARG ORT_VERSION=1.31.1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Debian bookworm's python3 is 3.11. Only the wheel's shared library is used, so its Python
# dependencies are skipped (--no-deps).
ENV ORT_DYLIB_PATH=/opt/ort/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}
RUN python3 -m venv /opt/ort \
 && /opt/ort/bin/pip install --no-cache-dir --no-deps --disable-pip-version-check "onnxruntime==${ORT_VERSION}" \
 && test -f "$ORT_DYLIB_PATH"

COPY --from=builder /usr/local/bin/sluice /usr/local/bin/sluice
WORKDIR /app
COPY models/ models/
COPY topologies/ topologies/
COPY samples/ samples/
# Inside a container the metrics endpoint must listen on all interfaces for Prometheus
# (deploy/prometheus.yml scrapes worker:9464); the topologies say 127.0.0.1 for local runs.
RUN sed -i -E 's|^listen = "127\.0\.0\.1:[0-9]+"|listen = "0.0.0.0:9464"|' topologies/qa_csv_postgres.toml \
 && grep -q '^listen = "0.0.0.0:9464"' topologies/qa_csv_postgres.toml \
 && sed -i -E 's|^listen = "127\.0\.0\.1:9466"|listen = "0.0.0.0:9466"|' topologies/rides_kafka.toml \
 && grep -q '^listen = "0.0.0.0:9466"' topologies/rides_kafka.toml
RUN useradd --system --home /app sluice && mkdir -p /app/out && chown -R sluice /app
USER sluice
ENV SLUICE_PG_HOST=postgres
EXPOSE 9464
ENTRYPOINT ["sluice"]
CMD ["run", "topologies/qa_csv_postgres.toml", "--no-progress"]
