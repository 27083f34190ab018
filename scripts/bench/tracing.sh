#!/usr/bin/env bash
# What tracing costs (issue 35), side by side in one run (not in CI; a quiet machine):
#   scripts/bench/tracing.sh BIN_DIR OUT_DIR [ROUNDS] [SECONDS]
#
# Four stacks, each a mall app (SQLite, its own data) behind a sidecar: `off` (no OTEL_*
# variables), `ratio-0.01` and `ratio-1` (OTEL_TRACES_SAMPLER=traceidratio with that ratio, both
# programs exporting to one sink that answers 200 without decoding: tests/otlp/receiver.py
# --discard), and `off-b`, a second stack without tracing: the A/A control, whose ratio to `off`
# is the method's own noise. The order rotates from round to round (A B C D, B C D A, ...). scripts/bench/proxies.py measures the cache-hit and pass-through paths through each
# sidecar (wrk, interleaved rounds, CPU of the sidecar and its app per request); then
# scripts/bench/orders.py measures seed 001's orders at 20 concurrent straight to three apps on one
# SQLite database (interleaved, with the database check). Results go to OUT_DIR/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "$1")
out=$(realpath -m "$2")
rounds="${3:-3}"
seconds="${4:-10}"
mkdir -p "$out"
work=$(mktemp -d)
pids=()
stop_all() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop_all EXIT
python="${MALL_TEST_OTLP_PYTHON:-python3}"
"$python" tests/otlp/receiver.py --port 4318 --discard >"$work/sink.log" 2>&1 &
pids+=($!)
tracing_env() {
  case "$1" in
    off | off-b) ;;
    ratio-0.01) echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01" ;;
    ratio-1) echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=1" ;;
  esac
}
contenders=()
app_pid=
i=0
for name in off ratio-0.01 off-b ratio-1; do
  i=$((i + 1))
  app_port=$((3500 + i)); proxy_port=$((3510 + i)); admin_port=$((3520 + i))
  # shellcheck disable=SC2046
  env $(tracing_env "$name") MALL_LOG_FORMAT=json "$bin/mall-app" serve --listen "127.0.0.1:$app_port" \
    --data-dir "$work/data-$name" --seed >"$work/app-$name.log" 2>&1 &
  app=$!; pids+=("$app")
  [ -n "$app_pid" ] || app_pid=$app
  cat >"$work/sidecar-$name.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
threads = 1
[access_log]
enabled = false
[rate_limit]
enabled = false
[[upstream.servers]]
address = "127.0.0.1:$app_port"
EOF
  # shellcheck disable=SC2046
  env $(tracing_env "$name") "$bin/sidecar" -c "$work/sidecar-$name.toml" >"$work/sidecar-$name.log" 2>&1 &
  sidecar=$!; pids+=("$sidecar")
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$proxy_port/api/products/1" >/dev/null && break
    sleep 0.2
  done
  contenders+=(--contender "$name=http://127.0.0.1:$proxy_port=$sidecar,$app")
done
python3 scripts/bench/proxies.py --out "$out" --rounds "$rounds" --seconds "$seconds" --app-pid "$app_pid" --rotate \
  --skip off:gzip --skip ratio-0.01:gzip --skip off-b:gzip --skip ratio-1:gzip \
  --skip off:uncached --skip ratio-0.01:uncached --skip off-b:uncached --skip ratio-1:uncached \
  "${contenders[@]}"
python3 scripts/bench/orders.py --bin "$bin" --work "$work" --out "$out" --rounds "$rounds" --seconds "$seconds" \
  --backends sqlite --workloads orders --group tracing_orders --rotate \
  --contenders "off=;ratio-0.01=$(tracing_env ratio-0.01);off-b=;ratio-1=$(tracing_env ratio-1)"
