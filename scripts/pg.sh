#!/usr/bin/env bash
# Makes sure a local PostgreSQL is running with the `sluice` role and database the tests use:
#   postgres://sluice:sluice@127.0.0.1:5432/sluice
# Installs PostgreSQL from apt when it is missing (needs root). On a machine with Docker, the
# docker-compose.yml service gives the same URL instead.
set -euo pipefail
if [ "${1:-}" = "restart" ]; then
  # Used by the crash tests: restart the local cluster under a running worker.
  read -r ver name _ < <(pg_lsclusters -h | head -n1)
  pg_ctlcluster "$ver" "$name" restart
  echo "pg: restarted $ver/$name"
  exit 0
fi
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && PGPASSWORD=sluice psql -h 127.0.0.1 -U sluice -d sluice -tAc "select 1" >/dev/null 2>&1; then
  echo "pg: running, database sluice ready"
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
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi; }
as_pg "psql -qtAc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='sluice') THEN CREATE ROLE sluice LOGIN SUPERUSER PASSWORD 'sluice'; END IF; END \\\$\\\$;\""
as_pg "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='sluice'\" | grep -q 1 || createdb -O sluice sluice"
echo "pg: running, database sluice ready (postgres://sluice:sluice@127.0.0.1:5432/sluice)"
