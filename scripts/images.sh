#!/usr/bin/env bash
# Builds the three images (docker/*.Dockerfile) on a machine whose Docker Engine cannot pull:
# the bases are made here from Debian packages, and the binaries are the workspace's release
# builds (compiled once, by cargo, outside any image).
#
#   scripts/images.sh            # bases (once), release binaries, then the three images
#   IMAGE_TAG=0.1.0 scripts/images.sh
#   scripts/images.sh bases      # only the two bases
#
# Two local bases, each a `docker import` of a debootstrap --variant=minbase bookworm tree:
# - mall-runtime-base:bookworm, as close to gcr.io/distroless/cc-debian12:nonroot as Debian
#   allows: only the files of libc6, libgcc-s1, ca-certificates (the bundle), tzdata, netbase and
#   base-files, plus /etc/passwd and /etc/group with root and nonroot (65532), /home/nonroot and a
#   sticky /tmp; no shell, no package manager, no coreutils.
# - mall-build-base:bookworm, the whole minbase tree (it has /bin/sh): the Dockerfiles' build
#   stage runs on it with the prebuilt binary already in /out, so its `RUN` copies instead of
#   compiling (BUILDER_IMAGE; see docker/README.md).
# The runtime stage of each Dockerfile is the one users get; only its FROM differs
# (RUNTIME_IMAGE).
#
# Idempotent: a base that exists is kept (MALL_REBUILD_BASES=1 makes them again).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

TAG="${IMAGE_TAG:-0.1.0}"
WORK="${MALL_IMAGES_DIR:-/var/tmp/mall-images}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
RUNTIME_BASE=mall-runtime-base:bookworm
BUILD_BASE=mall-build-base:bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

need_docker() {
  if ! docker info >/dev/null 2>&1; then
    echo "error: no Docker Engine answers (docker info failed): install and start one (apt-get install docker.io; dockerd &), or point DOCKER_HOST at one" >&2
    exit 1
  fi
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

make_bases() {
  if [ -z "${MALL_REBUILD_BASES:-}" ] && image_exists "$RUNTIME_BASE" && image_exists "$BUILD_BASE"; then
    return 0
  fi
  apt_install debootstrap
  local rootfs="$WORK/rootfs" runtime="$WORK/runtime"
  if [ ! -f "$rootfs/.complete" ] || [ -n "${MALL_REBUILD_BASES:-}" ]; then
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    echo "debootstrap --variant=minbase bookworm (a few minutes)" >&2
    debootstrap --variant=minbase --include=ca-certificates,tzdata,netbase bookworm "$rootfs" "$MIRROR" >/dev/null
    touch "$rootfs/.complete"
  fi
  tar -C "$rootfs" --exclude=./.complete --exclude=./proc --exclude=./sys --exclude=./dev -c . |
    docker import --change 'CMD ["/bin/sh"]' - "$BUILD_BASE" >/dev/null

  # The runtime base: the listed packages' files only.
  rm -rf "$runtime"
  mkdir -p "$runtime/usr"
  # Merged /usr first (/lib -> usr/lib, ...), so the packages' /lib paths land under /usr.
  for link in bin sbin lib lib64; do
    if [ -L "$rootfs/$link" ]; then
      mkdir -p "$runtime/usr/$link"
      cp -a "$rootfs/$link" "$runtime/$link"
    fi
  done
  for pkg in libc6 libgcc-s1 ca-certificates tzdata netbase base-files; do
    chroot "$rootfs" dpkg-query -L "$pkg" | while read -r path; do
      [ -e "$rootfs$path" ] || [ -L "$rootfs$path" ] || continue
      if [ -d "$rootfs$path" ] && [ ! -L "$rootfs$path" ]; then
        mkdir -p "$runtime$path"
      else
        mkdir -p "$runtime$(dirname "$path")"
        cp -a "$rootfs$path" "$runtime$path"
      fi
    done
  done
  # The CA bundle that update-ca-certificates generated.
  mkdir -p "$runtime/etc/ssl/certs"
  cp -aL "$rootfs/etc/ssl/certs/ca-certificates.crt" "$runtime/etc/ssl/certs/ca-certificates.crt"
  cp -a "$rootfs/etc/localtime" "$runtime/etc/localtime" 2>/dev/null || ln -sf /usr/share/zoneinfo/Etc/UTC "$runtime/etc/localtime"
  rm -rf "$runtime/usr/share/doc" "$runtime/usr/share/man" "$runtime/usr/share/lintian" "$runtime/usr/share/locale"
  # No shell, no package manager: drop any that came along (base-files ships none; check).
  rm -f "$runtime/bin/sh" "$runtime/usr/bin/sh" "$runtime/bin/bash" "$runtime/usr/bin/bash" "$runtime/usr/bin/dpkg" "$runtime/usr/bin/apt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$runtime/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$runtime/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$runtime/etc/nsswitch.conf"
  mkdir -p "$runtime/home/nonroot" "$runtime/root" "$runtime/tmp"
  chown 65532:65532 "$runtime/home/nonroot"
  chmod 1777 "$runtime/tmp"
  tar -C "$runtime" --numeric-owner -c . |
    docker import --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' - "$RUNTIME_BASE" >/dev/null
  echo "bases: $RUNTIME_BASE $(docker image inspect -f '{{.Size}}' "$RUNTIME_BASE") bytes, $BUILD_BASE" >&2
}

# The release binaries, built once by cargo (the workspace's own target dir).
build_binaries() {
  command -v cargo >/dev/null || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
  apt_install cmake
  cargo build --release --locked -p mall-app --bin mall-app -p mall-sidecar --bin sidecar \
    -p mall-operator --bin operator -p mall-e2e --bin pod-pause >&2
}

# The tests' pod runner (tests/src/pod_runner.rs) holds each pod's network namespace in a
# container of this image, as the kubelet's pause container does.
build_infra_image() {
  local ctx
  ctx=$(mktemp -d)
  cp "$TARGET/release/pod-pause" "$ctx/pod-pause"
  printf 'FROM %s\nCOPY pod-pause /pod-pause\nUSER 65535:65535\nENTRYPOINT ["/pod-pause"]\n' "$RUNTIME_BASE" >"$ctx/Dockerfile"
  docker build -q -t mall-pod-infra:local "$ctx" >/dev/null
  rm -rf "$ctx"
}

# One image: a builder image that already holds the binary in /out, then the Dockerfile.
build_image() { # build_image NAME BINARY
  local name=$1 binary=$2 ctx
  ctx=$(mktemp -d)
  cp "$TARGET/release/$binary" "$ctx/$binary"
  printf 'FROM %s\nCOPY %s /out/%s\n' "$BUILD_BASE" "$binary" "$binary" >"$ctx/Dockerfile"
  docker build -q -t "mall-prebuilt-$name:$TAG" "$ctx" >/dev/null
  rm -rf "$ctx"
  docker build -q -f "docker/$name.Dockerfile" \
    --build-arg "BUILDER_IMAGE=mall-prebuilt-$name:$TAG" \
    --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" \
    --build-arg "VERSION=$TAG" \
    -t "ghcr.io/mall-operator/$name:$TAG" . >/dev/null
  echo "ghcr.io/mall-operator/$name:$TAG $(docker image inspect -f '{{.Size}}' "ghcr.io/mall-operator/$name:$TAG") bytes" >&2
}

need_docker
make_bases
[ "${1:-}" = bases ] && exit 0
[ -n "${MALL_SKIP_CARGO:-}" ] || build_binaries
build_image mall-app mall-app
build_image sidecar sidecar
build_image operator operator
build_infra_image
