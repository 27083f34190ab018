#!/usr/bin/env bash
# The main job: builds the mall app (release) and runs it on its embedded default (SQLite in
# ./data, in-process cache), seeded with products 1..1000 and users user1..user100, listening on
# http://127.0.0.1:8080 (set MALL_LISTEN to change). Any MALL_* variable is honoured; see README.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
cargo build --release -p mall-app
bin="${CARGO_TARGET_DIR:-target}/release/mall-app"
listen="${MALL_LISTEN:-127.0.0.1:8080}"
cat <<MSG

  mall app: http://$listen
    curl http://$listen/api/products/1
    curl 'http://$listen/api/products?category=books&limit=5&fields=id,name,price'
    curl http://$listen/ready
    curl http://$listen/metrics
  log in as user1 / mall-password (admin / mall-password for admin endpoints).
  Ctrl-C stops it.

MSG
export MALL_LOG_FORMAT="${MALL_LOG_FORMAT:-text}"
exec "$bin" --seed --listen "$listen" "$@"
