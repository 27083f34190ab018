# The MallDeployment operator.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t ghcr.io/mall-operator/operator:0.1.0 .
# Multi-stage: the Rust toolchain builds a release binary; the runtime image is distroless (glibc,
# CA certificates, no shell) and runs as the unprivileged user 65532.

# The bases are build arguments, so a machine that cannot pull builds from bases of its own
# (scripts/images.sh): BUILDER_IMAGE has the Rust toolchain, or already holds the release binary in
# /out (then the build stage copies instead of compiling); RUNTIME_IMAGE is distroless cc or a
# base made to match it. Works with BuildKit and with the classic builder.
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
RUN if [ -x /out/operator ]; then echo "using the prebuilt /out/operator"; \
    else cargo build --release --locked -p mall-operator --bin operator \
      && mkdir -p /out && cp target/release/operator /out/operator; fi

# The runtime stage users get (gcr.io/distroless/cc-debian12:nonroot by default).
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="operator" \
      org.opencontainers.image.description="The MallDeployment operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/operator /usr/local/bin/operator

USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/operator"]
CMD ["run"]
