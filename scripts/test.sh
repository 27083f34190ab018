#!/usr/bin/env bash
# Runs the whole test suite against real SQLite, PostgreSQL, MariaDB and Redis, promtool, helm,
# and the images as pods on the Docker Engine.
# Installs (Debian packages) and starts whichever of them is missing; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

command -v cargo >/dev/null || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
# cmake builds pingora's zlib-ng; prometheus (promtool, the server) and prometheus-alertmanager run the
# alert-rule tests and the alert -> scale end-to-end test.
apt_install postgresql-client mariadb-client redis-tools cmake prometheus prometheus-alertmanager
ensure_redis
ensure_helm
ensure_postgres
ensure_mariadb
ensure_pg_replicas
ensure_mariadb_replicas
ensure_otlp_proto
ensure_go

# The images, run as pods by tests/tests/pods.rs on the Docker Engine (bases from Debian packages,
# binaries from the workspace's release build; see scripts/images.sh).
if docker info >/dev/null 2>&1; then
  scripts/images.sh
elif [ "${CI:-}" = true ]; then
  echo "error: no Docker Engine answers (docker info): the pod tests need one; install and start it (apt-get install docker.io && dockerd &)" >&2
  exit 1
else
  echo "SKIPPED: no Docker Engine: the images are not built and the pod tests skip (under CI=true this fails)" >&2
fi

export MALL_TEST_POSTGRES_URL="${MALL_TEST_POSTGRES_URL:-postgres://mall:mall@127.0.0.1:5432/test}"
export MALL_TEST_MYSQL_URL="${MALL_TEST_MYSQL_URL:-mysql://mall:mall@127.0.0.1:3306/test}"
export MALL_TEST_REDIS_URL="${MALL_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

cargo test --workspace "$@"
