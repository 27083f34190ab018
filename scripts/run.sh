#!/usr/bin/env bash
# The main job, without a cluster: the whole data path on one machine. Builds the mall app and
# the sidecar (release), seeds one SQLite database in ./data, starts MALL_INSTANCES (default 2)
# app instances on it (in-process cache each) and the sidecar in front of them on
# http://127.0.0.1:8080, prints the URLs, and on Ctrl-C (or SIGTERM) stops everything it started.
#
# The sidecar runs the documented example configuration (sidecar/sidecar.example.toml, the schema
# the operator renders), with its listeners and upstreams overridden from the environment.
# Any MALL_* variable is honoured by the app instances; SIDECAR__* variables by the sidecar.
#
# Logs go to files under $MALL_DATA_DIR/logs (the banner says how to follow them), so the URLs stay
# on screen; on a terminal a status line below them shows requests per second, the cache hit ratio
# and healthy upstreams, refreshed every 2 s. RUN_LOGS=terminal sends the logs to the terminal
# instead (as before).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

command -v cargo >/dev/null || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
apt_install cmake curl # cmake builds pingora's zlib-ng; curl waits for readiness
cargo build --release -p mall-app -p mall-sidecar
target="${CARGO_TARGET_DIR:-target}/release"

instances="${MALL_INSTANCES:-2}"
first_port="${MALL_FIRST_PORT:-3001}"
listen="${SIDECAR_LISTEN:-127.0.0.1:8080}"
admin="${SIDECAR_ADMIN_LISTEN:-127.0.0.1:9901}"
data_dir="${MALL_DATA_DIR:-./data}"
export MALL_LOG_FORMAT="${MALL_LOG_FORMAT:-text}" SIDECAR_LOG_FORMAT="${SIDECAR_LOG_FORMAT:-text}"
# Each instance follows the database's invalidation records (a 50 ms poll on SQLite) and purges
# the sidecar of what they name, so a write through any instance is seen everywhere within ~0.1 s.
export MALL_SIDECAR_PURGE_URL="${MALL_SIDECAR_PURGE_URL:-http://$listen}"

pids=()
stop() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$target/mall-app" seed --data-dir "$data_dir"

logs_to_terminal=false
[ "${RUN_LOGS:-files}" = terminal ] && logs_to_terminal=true
log_dir="$data_dir/logs"
mkdir -p "$log_dir"
# Runs "$@" in the background, its output to the terminal or to $log_dir/$1.log.
launch() {
  local name=$1; shift
  if $logs_to_terminal; then
    "$@" &
  else
    "$@" >>"$log_dir/$name.log" 2>&1 &
  fi
  pids+=($!)
}

servers=()
for i in $(seq 0 $((instances - 1))); do
  port=$((first_port + i))
  launch "app-$((i + 1))" env MALL_WORKER_ID=$((i + 1)) "$target/mall-app" serve --listen "127.0.0.1:$port" --data-dir "$data_dir" "$@"
  servers+=("{ address = \"127.0.0.1:$port\" }")
done
upstreams="[$(IFS=,; echo "${servers[*]}")]"

launch sidecar env SIDECAR__SERVER__LISTEN="$listen" SIDECAR__SERVER__ADMIN_LISTEN="$admin" \
  SIDECAR__UPSTREAM__SERVERS="$upstreams" "$target/sidecar" -c sidecar/sidecar.example.toml

wait_for 30 curl -sf "http://$admin/ready" || { echo "error: the stack did not become ready" >&2; exit 1; }
cat <<MSG

  mall (through the sidecar): http://$listen   -> $instances app instances on ports $first_port..$((first_port + instances - 1))
    curl -si http://$listen/api/products/1 | grep -i x-cache      # MISS, then HIT
    curl -s -H 'accept-encoding: gzip' 'http://$listen/api/products?limit=50' | gunzip | head -c 200
    curl 'http://$listen/api/products?category=books&limit=5&fields=id,name,price'
  sidecar admin: http://$admin/metrics  http://$admin/ready
  an app instance directly: http://127.0.0.1:$first_port/metrics
  log in as user1 / mall-password (admin / mall-password for admin endpoints).
MSG
if $logs_to_terminal; then
  echo "  Ctrl-C stops everything."
else
  echo "  logs: tail -f $log_dir/*.log   (RUN_LOGS=terminal shows them here instead)"
  echo "  Ctrl-C stops everything."
fi
echo

# One status line, rewritten in place every 2 s, from the sidecar's own metrics.
status_line() {
  local before now
  before=$(curl -sf "http://$admin/metrics" | awk '/^sidecar_http_requests_total/ {s += $NF} END {print s + 0}')
  while sleep 2; do
    curl -sf "http://$admin/metrics" >"$log_dir/.metrics" || continue
    now=$(awk '/^sidecar_http_requests_total/ {s += $NF} END {print s + 0}' "$log_dir/.metrics")
    awk -v before="$before" -v now="$now" '
      /^sidecar_cache_hit_ratio / {hit = $NF}
      /^sidecar_upstream_healthy/ {up += $NF; n++}
      END {printf "\r  %8.1f req/s   cache hit ratio %5.1f %%   upstreams healthy %d/%d   ", (now - before) / 2, hit * 100, up, n}
    ' "$log_dir/.metrics"
    before=$now
  done
}
if [ -t 1 ] && ! $logs_to_terminal; then
  status_line &
  pids+=($!)
fi
# Stop everything as soon as any part exits on its own.
wait -n "${pids[@]}"
echo "a process of the stack exited; stopping the rest" >&2
exit 1
