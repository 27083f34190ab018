#!/usr/bin/env bash
# The benchmarks (not run in CI): everything side by side in one run on this machine, written to
# BENCHMARKS.md (tables, ratios, the commands) and bench/results/ (raw outputs, SVG plot).
#
#   scripts/bench.sh                 # about 35 minutes; BENCH_SECONDS=N per measurement (default 10)
#
# 1. Proxies: the sidecar, nginx (Debian's, configured to do the same job: proxy_cache, gzip,
#    upstream keep-alive) and a bare pingora ProxyHttp (pingora's floor: hits from a map, one
#    keep-alive peer) in front of one mall app, and a bare hyper server returning a fixed body (the
#    machine's ceiling); wrk at fixed concurrency on the cache-hit, pass-through and gzip paths in
#    interleaved rounds after a warm-up past max-age (scripts/bench/proxies.py); req/s, p99 and
#    CPU per request of each proxy's processes, medians and the per-round ratios to nginx.
# 2. The app: seed 001's four scenarios (mall-load) on SQLite, PostgreSQL, PostgreSQL + Redis; then
#    group commit against one order per transaction on SQLite, PostgreSQL and MariaDB, and the
#    array-parameter batches against the multi-row ones on PostgreSQL and MariaDB
#    (scripts/bench/orders.py): the orders scenario, the flash sale and one lone client, in
#    interleaved rounds, with the database check.
# 3. The caches: database queries per 1,000 catalog reads with the app cache on and off, hit
#    ratios under a Zipf key distribution, bytes on the wire with and without gzip.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

seconds="${BENCH_SECONDS:-10}"
conns="${BENCH_CONNECTIONS:-64}"
apt_install cmake nginx-light wrk postgresql-client mariadb-client redis-tools curl
ensure_postgres
ensure_redis
ensure_mariadb  # orders (2b, 2c) and the staleness test (3b) run against MariaDB too
cargo build --release -p mall-app -p mall-sidecar -p mall-loadgen --bins
bin="${CARGO_TARGET_DIR:-target}/release"
out=bench/results
mkdir -p "$out"
rm -f "$out"/*.txt "$out"/*.json "$out"/*.jsonl
work=$(mktemp -d)
pids=()
stop_all() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap 'stop_all; rm -rf "$work"' EXIT
log() { echo "== $*" >&2; }
result() { echo "$1" >>"$out/results.jsonl"; }

cpu_ticks() { # total user+system ticks of the given pids
  local total=0
  for p in "$@"; do
    local fields
    fields=$(sed 's/^.*) //' "/proc/$p/stat")
    total=$((total + $(echo "$fields" | awk '{print $12 + $13}')))
  done
  echo "$total"
}

start_app() { # start_app NAME PORT ARGS... -> app pid in $app_pid
  local name=$1 port=$2; shift 2
  MALL_LOG_FORMAT=json "$bin/mall-app" serve --listen "127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 &
  app_pid=$!
  pids+=("$app_pid")
  wait_for 60 curl -sf "http://127.0.0.1:$port/ready" || { echo "app $name did not start" >&2; cat "$work/$name.log" >&2; exit 1; }
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# ---------------------------------------------------------------- 1. proxies
log "proxies: one app, the sidecar, nginx, the hyper ceiling"
"$bin/mall-app" seed --data-dir "$work/data" >/dev/null
start_app proxied 3101 --data-dir "$work/data" --listen-socket "$work/app.sock"
# nginx's workers (www-data) connect to the app's socket too: connecting needs write permission.
chmod 666 "$work/app.sock"

SIDECAR__SERVER__LISTEN=127.0.0.1:8180 SIDECAR__SERVER__ADMIN_LISTEN=127.0.0.1:9180 SIDECAR__SERVER__THREADS=2 \
  SIDECAR__UPSTREAM__SERVERS='[{ address = "127.0.0.1:3101" }]' SIDECAR__UPSTREAM__BALANCE=round_robin \
  SIDECAR__RATE_LIMIT__ENABLED=false SIDECAR__ACCESS_LOG__ENABLED=false SIDECAR_LOG=warn \
  "$bin/sidecar" -c sidecar/sidecar.example.toml >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")
# The same sidecar reaching the same app through its Unix socket (as the operator's pods do).
SIDECAR__SERVER__LISTEN=127.0.0.1:8185 SIDECAR__SERVER__ADMIN_LISTEN=127.0.0.1:9185 SIDECAR__SERVER__THREADS=2 \
  SIDECAR__UPSTREAM__SERVERS='[{ address = "127.0.0.1:3101" }]' SIDECAR__UPSTREAM__BALANCE=round_robin \
  SIDECAR__UPSTREAM__LOCAL__SOCKET="$work/app.sock" SIDECAR__UPSTREAM__LOCAL__ADDRESS=127.0.0.1:3101 \
  SIDECAR__RATE_LIMIT__ENABLED=false SIDECAR__ACCESS_LOG__ENABLED=false SIDECAR_LOG=warn \
  "$bin/sidecar" -c sidecar/sidecar.example.toml >"$work/sidecar-uds.log" 2>&1 &
sidecar_uds_pid=$!
pids+=("$sidecar_uds_pid")

# nginx's workers run as www-data: they must reach the cache directory.
chmod 755 "$work"
mkdir -p "$work/nginx-cache" "$work/nginx-temp"
chown www-data "$work/nginx-cache" "$work/nginx-temp"
cat >"$work/nginx.conf" <<NGINX
user www-data;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $work/nginx-cache keys_zone=mall:16m max_size=64m inactive=10m use_temp_path=off;
  proxy_temp_path $work/nginx-temp;
  upstream app { server 127.0.0.1:3101; keepalive 64; }
  upstream app_uds { server unix:$work/app.sock; keepalive 64; }
  gzip on; gzip_min_length 1024; gzip_types application/json; gzip_proxied any; gzip_vary on; gzip_comp_level 6;
  server {
    listen 127.0.0.1:8181;
    location /api/products {
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache mall; proxy_cache_lock on; proxy_cache_use_stale updating error timeout;
      proxy_cache_bypass \$http_cookie; proxy_no_cache \$http_cookie;
      add_header X-Cache \$upstream_cache_status;
    }
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:8184;
    location / { proxy_pass http://app_uds; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" -g 'daemon on;'
"$bin/fixed-body" 127.0.0.1:8182 >"$work/ceiling.log" 2>&1 &
ceiling_pid=$!
pids+=("$ceiling_pid")
wait_for 30 curl -sf http://127.0.0.1:9180/ready
wait_for 30 curl -sf http://127.0.0.1:9185/ready
wait_for 30 curl -sf http://127.0.0.1:8181/health
wait_for 30 curl -sf http://127.0.0.1:8184/health
wait_for 30 curl -sf http://127.0.0.1:8182/

"$bin/bare-pingora" 127.0.0.1:8183 127.0.0.1:3101 2 /api/products/1 >"$work/bare.log" 2>&1 &
bare_pid=$!
pids+=("$bare_pid")
wait_for 30 curl -sf http://127.0.0.1:8183/health

# Memory (resident set, KiB) of each proxy's processes: idle, with 1,000 products cached, and after
# 256 connections (wrk holds them for 3 s; the figure is taken as it ends). nginx keeps its cache
# on disk (the page cache holds it, counted by no process); the sidecar keeps it in memory.
rss_kib() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }
nginx_all=$(pgrep -f "nginx: (master|worker) process" | tr '\n' ' ')
memory() { # memory NAME BASE PIDS...
  local name=$1 base=$2; shift 2
  local idle cached conns
  idle=$(rss_kib "$@")
  curl -s -o /dev/null "$base/api/products/[1-1000]"
  cached=$(rss_kib "$@")
  wrk -t2 -c256 -d3s "$base/health" >/dev/null
  conns=$(rss_kib "$@")
  result "{\"group\":\"memory\",\"target\":\"$name\",\"idle_kib\":$idle,\"cached_kib\":$cached,\"conns_kib\":$conns}"
}
log "memory: idle, 1,000 entries, 256 connections"
# shellcheck disable=SC2086
memory nginx http://127.0.0.1:8181 $nginx_all
memory bare-pingora http://127.0.0.1:8183 "$bare_pid"
memory sidecar http://127.0.0.1:8180 "$sidecar_pid"

# Interleaved rounds (nginx, bare pingora, sidecar, ceiling, ...) after a warm-up past max-age.
nginx_pids=$(pgrep -f "nginx: worker process" | paste -sd, -)
python3 scripts/bench/proxies.py --out "$out" --seconds "$seconds" --rounds "${BENCH_ROUNDS:-3}" \
  --connections "$conns" --app-pid "$app_pid" \
  --contender "nginx=http://127.0.0.1:8181=$nginx_pids" \
  --contender "nginx-uds=http://127.0.0.1:8184=$nginx_pids" \
  --contender "bare-pingora=http://127.0.0.1:8183=$bare_pid" \
  --contender "sidecar=http://127.0.0.1:8180=$sidecar_pid" \
  --contender "sidecar-uds=http://127.0.0.1:8185=$sidecar_uds_pid" \
  --contender "ceiling=http://127.0.0.1:8182=$ceiling_pid" \
  --skip bare-pingora:gzip --skip ceiling:pass --skip ceiling:gzip --skip ceiling:uncached \
  --skip nginx-uds:hit --skip nginx-uds:gzip --skip sidecar-uds:hit --skip sidecar-uds:gzip

# Bytes on the wire for a catalog page in each coding, through the sidecar, as fresh hits (the
# identity request refreshes the entry; br is given to fresh hits only).
page=http://127.0.0.1:8180/api/products?limit=50
plain=$(curl -s "$page" | wc -c)
coded() { # coded CODING -> bytes, after checking the answer was a hit in that coding
  local headers
  headers=$(curl -s -D - -o "$work/coded" -H "Accept-Encoding: $1" "$page" | tr -d '\r' | tr 'A-Z' 'a-z')
  grep -q "^content-encoding: $1\$" <<<"$headers" && grep -q '^x-cache: hit$' <<<"$headers" \
    || { echo "the $1 page was not a $1 hit:" >&2; echo "$headers" >&2; exit 1; }
  wc -c <"$work/coded"
}
gz=$(coded gzip)
zst=$(coded zstd)
br=$(coded br)
result "{\"group\":\"wire\",\"plain_bytes\":$plain,\"gzip_bytes\":$gz,\"zstd_bytes\":$zst,\"br_bytes\":$br}"

# Sidecar hit ratio under a Zipf key distribution (the app's max-age=5 bounds the entries' life).
log "zipf through the sidecar"
before_hits=$(curl -s http://127.0.0.1:9180/metrics | awk '/^sidecar_cache_requests_total\{result="(HIT|STALE)"\}/ {s+=$2} END {print s+0}')
before_miss=$(curl -s http://127.0.0.1:9180/metrics | awk '/^sidecar_cache_requests_total\{result="MISS"\}/ {s+=$2} END {print s+0}')
"$bin/mall-load" --target http://127.0.0.1:8180 --scenario products --zipf --duration "$seconds" --json >"$out/load-sidecar-zipf.json"
after_hits=$(curl -s http://127.0.0.1:9180/metrics | awk '/^sidecar_cache_requests_total\{result="(HIT|STALE)"\}/ {s+=$2} END {print s+0}')
after_miss=$(curl -s http://127.0.0.1:9180/metrics | awk '/^sidecar_cache_requests_total\{result="MISS"\}/ {s+=$2} END {print s+0}')
result "{\"group\":\"sidecar_zipf\",\"hits\":$((after_hits - before_hits)),\"misses\":$((after_miss - before_miss))}"

kill "$(cat "$work/nginx.pid")"
stop_pid "$sidecar_pid"
stop_pid "$sidecar_uds_pid"
stop_pid "$ceiling_pid"
stop_pid "$bare_pid"
stop_pid "$app_pid"

# ---------------------------------------------------------------- 2. app scenarios
app_metric() { # app_metric PORT REGEX -> sum of matching series
  curl -s "http://127.0.0.1:$1/metrics" | awk -v re="$2" '$0 ~ re {s+=$NF} END {printf "%d\n", s+0}'
}

scenarios() { # scenarios BACKEND PORT
  for scenario in stock cart orders mixed; do
    log "app $1: $scenario"
    "$bin/mall-load" --target "http://127.0.0.1:$2" --scenario "$scenario" --duration "$seconds" --json \
      >"$out/load-$1-$scenario.json"
  done
}

# The stock and order scenarios take units from products 1..20 for 40 s per backend; the default
# 10,000 each would run out (409s) as the app gets faster.
seed_stock=1000000
log "app on SQLite"
rm -rf "$work/data"
"$bin/mall-app" seed --data-dir "$work/data" --seed-stock "$seed_stock" >/dev/null
start_app sqlite 3201 --data-dir "$work/data"
scenarios sqlite 3201
stop_pid "$app_pid"

pg="postgres://mall:mall@127.0.0.1:5432/mall_bench"
fresh_pg() { # a newly seeded database: one backend's runs must not use up the next one's stock
  psql -q "postgres://mall:mall@127.0.0.1:5432/test" -c "DROP DATABASE IF EXISTS mall_bench" -c "CREATE DATABASE mall_bench"
  "$bin/mall-app" seed --database-url "$pg" --seed-stock "$seed_stock" >/dev/null
}
fresh_pg
log "app on PostgreSQL"
start_app postgres 3202 --database-url "$pg"
scenarios postgres 3202
stop_pid "$app_pid"
fresh_pg
redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'mall-bench:*' | xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
log "app on PostgreSQL + Redis"
start_app postgres-redis 3203 --database-url "$pg" --redis-url redis://127.0.0.1:6379 --redis-prefix mall-bench
scenarios postgres-redis 3203
stop_pid "$app_pid"

# ---------------------------------------------------------------- 2b. group commit of orders
log "orders: group commit against one order per transaction, interleaved rounds"
python3 scripts/bench/orders.py --bin "$bin" --work "$work" --out "$out" --seconds "$seconds" \
  --rounds "${BENCH_ROUNDS:-3}" --flash-stock "${BENCH_FLASH_STOCK:-5000}" --backends sqlite,postgres,mariadb

# ---------------------------------------------------------------- 2c. batch statements with array parameters
log "orders on PostgreSQL and MariaDB: array-parameter batches against multi-row statements, interleaved rounds"
python3 scripts/bench/orders.py --bin "$bin" --work "$work" --out "$out" --seconds "$seconds" \
  --rounds "${BENCH_ROUNDS:-3}" --flash-stock "${BENCH_FLASH_STOCK:-5000}" --backends postgres,mariadb \
  --group orders_arrays --contenders "rows=--order-batch-arrays false;arrays=--order-batch-arrays true"

# ---------------------------------------------------------------- 3b. invalidation records
log "invalidation: what the follower costs an idle instance"
python3 scripts/bench/follower.py --bin "$bin" --work "$work" --out "$out"
log "invalidation: staleness after a write, every topology (tests/tests/read_your_writes.rs)"
MALL_TEST_POSTGRES_URL="${MALL_TEST_POSTGRES_URL:-postgres://mall:mall@127.0.0.1:5432/test}" \
MALL_TEST_MYSQL_URL="${MALL_TEST_MYSQL_URL:-mysql://mall:mall@127.0.0.1:3306/test}" \
  cargo test -q -p mall-e2e --test read_your_writes -- --nocapture --test-threads 1 2>&1 |
  sed -n 's/^.*STALENESS //p' >>"$out/results.jsonl"

# ---------------------------------------------------------------- 5. the waiting room
log "waiting room against today's 429 limit: a flash sale at full size, interleaved rounds"
python3 scripts/bench/room.py --bin "$bin" --work "$work" --out "$out" --rounds "${BENCH_ROUNDS:-3}"
log "waiting room against today's 429 limit: a flash sale over two pods (tests/tests/waiting_room.rs)"
MALL_TEST_POSTGRES_URL="${MALL_TEST_POSTGRES_URL:-postgres://mall:mall@127.0.0.1:5432/test}" \
  cargo test -q -p mall-e2e --test waiting_room -- --nocapture 2>&1 |
  sed -n 's/^.*SALE //p' >>"$out/results.jsonl"

# ---------------------------------------------------------------- 3. the app's cache
for cache in on off; do
  args=(--database-url "$pg")
  [ "$cache" = off ] && args+=(--cache-bytes 0)
  log "catalog reads with the app cache $cache"
  start_app "cache-$cache" 3204 "${args[@]}"
  before=$(app_metric 3204 '^db_operations_total')
  "$bin/mall-load" --target http://127.0.0.1:3204 --scenario products --zipf --requests 20000 --concurrency 32 --json \
    >"$out/load-cache-$cache.json"
  after=$(app_metric 3204 '^db_operations_total')
  hits=$(app_metric 3204 '^cache_hits_total.*category="product"')
  misses=$(app_metric 3204 '^cache_misses_total.*category="product"')
  result "{\"group\":\"app_cache\",\"cache\":\"$cache\",\"requests\":20000,\"db_ops\":$((after - before)),\"hits\":$hits,\"misses\":$misses}"
  stop_pid "$app_pid"
done

# ---------------------------------------------------------------- the report
python3 scripts/bench/report.py "$out" \
  --machine "$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)" \
  --versions "$(rustc --version); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); PostgreSQL $(psql --version | awk '{print $3}'); Redis $(redis-cli --version | awk '{print $2}')" \
  --seconds "$seconds" --connections "$conns" >"$work/BENCHMARKS.md"
# (Written aside first: the report keeps section 4 of the BENCHMARKS.md it replaces.)
mv "$work/BENCHMARKS.md" BENCHMARKS.md
log "wrote BENCHMARKS.md and $out/"
