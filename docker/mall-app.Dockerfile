# The bundled mall app (catalog, cart, orders).
# Build from the repository root:  docker build -f docker/mall-app.Dockerfile -t ghcr.io/mall-operator/mall-app:0.1.0 .
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
RUN if [ -x /out/mall-app ]; then echo "using the prebuilt /out/mall-app"; \
    else cargo build --release --locked -p mall-app --bin mall-app \
      && mkdir -p /out && cp target/release/mall-app /out/mall-app; fi && mkdir -p /data

# The runtime stage users get (gcr.io/distroless/cc-debian12:nonroot by default).
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mall-app" \
      org.opencontainers.image.description="The bundled mall app (catalog, cart, orders)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/mall-app /usr/local/bin/mall-app
# The embedded SQLite file lives here, writable by the runtime user.
COPY --from=build --chown=65532:65532 /data /data
ENV MALL_LISTEN=0.0.0.0:3000 MALL_DATA_DIR=/data
VOLUME /data
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/mall-app"]
CMD ["serve"]
