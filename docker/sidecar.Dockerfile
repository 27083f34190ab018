# syntax=docker/dockerfile:1
# The pingora sidecar proxy (cache, compression, rate limits, load balancing).
# Build from the repository root:  docker build -f docker/sidecar.Dockerfile -t ghcr.io/mall-operator/sidecar:0.1.0 .
# Multi-stage: the Rust toolchain builds a release binary; the runtime image is distroless (glibc,
# CA certificates, no shell) and runs as the unprivileged user 65532.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mall-sidecar --bin sidecar && cp target/release/sidecar /sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="The pingora sidecar proxy (cache, compression, rate limits, load balancing)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /sidecar /usr/local/bin/sidecar

USER 65532:65532
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["-c", "/etc/sidecar/sidecar.toml"]
