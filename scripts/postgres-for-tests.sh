#!/usr/bin/env bash
# Starts the Debian PostgreSQL cluster (no systemd here), makes a superuser role for root
# (peer authentication over the Unix socket) and exports ALOFT_TEST_POSTGRES_URL, which the
# control plane's store suite and the server tests (ALOFT_TEST_STORE=postgres) run against;
# a Unix socket, so servers inside test network namespaces reach it. Sourced by
# scripts/test.sh; fails (returns 1) when PostgreSQL does not come up, since the suite must run.
if command -v pg_lsclusters >/dev/null 2>&1; then
  read -r pg_version pg_cluster _ < <(pg_lsclusters -h 2>/dev/null | head -1) || true
  if [[ -z "${pg_version:-}" ]] && command -v pg_createcluster >/dev/null 2>&1; then
    pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_cluster=main
    pg_createcluster "$pg_version" "$pg_cluster" >/dev/null 2>&1 || true
  fi
  if [[ -n "${pg_version:-}" ]]; then
    pg_ctlcluster "$pg_version" "$pg_cluster" start >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do
      pg_isready -q -h /var/run/postgresql && break
      sleep 0.2
    done
    if pg_isready -q -h /var/run/postgresql; then
      if ! runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_roles WHERE rolname='$(id -un)'" 2>/dev/null | grep -q 1; then
        runuser -u postgres -- createuser -s "$(id -un)" >/dev/null 2>&1 || true
      fi
      export ALOFT_TEST_POSTGRES_URL="host=/var/run/postgresql user=$(id -un) dbname=postgres"
      echo "test: PostgreSQL $pg_version/$pg_cluster is up for the store suite"
    fi
  fi
fi
if [[ -z "${ALOFT_TEST_POSTGRES_URL:-}" ]]; then
  echo "test: PostgreSQL did not start (apt-get install postgresql; see scripts/postgres-for-tests.sh)" >&2
  return 1
fi
