# syntax=docker/dockerfile:1
# The MallDeployment operator.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t ghcr.io/mall-operator/operator:0.1.0 .
# Multi-stage: the Rust toolchain builds a release binary; the runtime image is distroless (glibc,
# CA certificates, no shell) and runs as the unprivileged user 65532.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mall-operator --bin operator && cp target/release/operator /operator

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="operator" \
      org.opencontainers.image.description="The MallDeployment operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /operator /usr/local/bin/operator

USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/operator"]
CMD ["run"]
