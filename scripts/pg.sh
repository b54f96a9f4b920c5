#!/usr/bin/env bash
# Makes sure a local PostgreSQL is running with the `sluice` role and database the tests use:
#   postgres://sluice:sluice@127.0.0.1:5432/sluice
# Installs PostgreSQL from apt when it is missing (needs root). On a machine with Docker, the
# docker-compose.yml service gives the same URL instead.
# TLS is turned on (`ssl = on`), with a self-signed certificate for `localhost` made with openssl
# when the cluster has none, for the sink's TLS tests (tests/postgres_tls.rs); the last line says
# where the server's certificate is.
set -euo pipefail
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi; }
sql() { PGPASSWORD=sluice psql -h 127.0.0.1 -U sluice -d sluice -qtAc "$1"; }
# Makes sure the server offers TLS, and prints its certificate's path.
ensure_tls() {
  local data cert key
  data=$(sql "SHOW data_directory")
  cert=$(sql "SHOW ssl_cert_file")
  key=$(sql "SHOW ssl_key_file")
  case "$cert" in /*) ;; *) cert="$data/$cert" ;; esac
  case "$key" in /*) ;; *) key="$data/$key" ;; esac
  if [ "$(sql "SHOW ssl")" != on ]; then
    if [ ! -s "$cert" ] || [ ! -s "$key" ]; then
      cert="$data/sluice-server.crt"
      key="$data/sluice-server.key"
      echo "pg: making a self-signed server certificate for localhost ($cert)"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost" -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$key" -out "$cert" 2>/dev/null
      chown postgres:postgres "$cert" "$key"
      chmod 600 "$key"
      sql "ALTER SYSTEM SET ssl_cert_file = '$cert'"
      sql "ALTER SYSTEM SET ssl_key_file = '$key'"
    fi
    sql "ALTER SYSTEM SET ssl = on"
    sql "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 1 50); do
      [ "$(sql "SHOW ssl")" = on ] && break
      sleep 0.1
    done
    [ "$(sql "SHOW ssl")" = on ] || { echo "pg: could not turn ssl on (see the server's log)" >&2; exit 1; }
  fi
  echo "pg: TLS on, server certificate: $cert"
}
if [ "${1:-}" = "restart" ]; then
  # Used by the crash tests: restart the local cluster under a running worker.
  read -r ver name _ < <(pg_lsclusters -h | head -n1)
  pg_ctlcluster "$ver" "$name" restart
  echo "pg: restarted $ver/$name"
  exit 0
fi
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && sql "select 1" >/dev/null 2>&1; then
  echo "pg: running, database sluice ready"
  ensure_tls
  exit 0
fi
if ! command -v pg_lsclusters >/dev/null; then
  echo "pg: installing PostgreSQL from apt"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
fi
cluster=$(pg_lsclusters -h 2>/dev/null | head -n1 || true)
if [ -z "$cluster" ]; then
  ver=$(ls /usr/lib/postgresql | sort -n | tail -n1)
  pg_createcluster "$ver" main >/dev/null
  cluster=$(pg_lsclusters -h | head -n1)
fi
ver=$(echo "$cluster" | awk '{print $1}')
name=$(echo "$cluster" | awk '{print $2}')
pg_ctlcluster "$ver" "$name" start 2>/dev/null || true
for _ in $(seq 1 50); do
  pg_isready -h 127.0.0.1 -p 5432 -q && break
  sleep 0.2
done
pg_isready -h 127.0.0.1 -p 5432 -q || { echo "pg: PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
as_pg "psql -qtAc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sluice') THEN CREATE ROLE sluice LOGIN SUPERUSER PASSWORD 'sluice'; END IF; END \\\$\\\$;\""
as_pg "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='sluice'\" | grep -q 1 || createdb -O sluice sluice"
echo "pg: running, database sluice ready (postgres://sluice:sluice@127.0.0.1:5432/sluice)"
ensure_tls
