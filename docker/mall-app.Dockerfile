# syntax=docker/dockerfile:1
# The bundled mall app (catalog, cart, orders).
# Build from the repository root:  docker build -f docker/mall-app.Dockerfile -t ghcr.io/mall-operator/mall-app:0.1.0 .
# Multi-stage: the Rust toolchain builds a release binary; the runtime image is distroless (glibc,
# CA certificates, no shell) and runs as the unprivileged user 65532.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mall-app --bin mall-app && cp target/release/mall-app /mall-app \
    && mkdir /data

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mall-app" \
      org.opencontainers.image.description="The bundled mall app (catalog, cart, orders)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /mall-app /usr/local/bin/mall-app
# The embedded SQLite file lives here, writable by the runtime user.
COPY --from=build --chown=65532:65532 /data /data
ENV MALL_LISTEN=0.0.0.0:3000 MALL_DATA_DIR=/data
VOLUME /data
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/mall-app"]
CMD ["serve"]
