#!/usr/bin/env bash
# Start a private PostgreSQL cluster for shared Optuna studies (`autotune worker study.storage=<URL>`) and
# the tests marked `postgres`. Installs Debian's postgresql when missing. Idempotent: when the cluster is
# already running it only prints the URL. The URL is the only line on stdout:
#   URL=$(scripts/start_postgres.sh)
# Settings (environment):
#   AUTOTUNE_PG_DIR   cluster directory (default <repo>/.cache/postgres; data, log and socket live there)
#   AUTOTUNE_PG_PORT  TCP port on 127.0.0.1 (default: the port this cluster used before, else 55432,
#                     else a free one)
# The cluster trusts connections from 127.0.0.1 only (user `autotune`, no password): a test and
# single-user store. Two databases: `autotune` for Optuna studies (the URL printed) and `mlflow` for an
# MLflow tracking server (`mlflow server --backend-store-uri <URL with /mlflow>`; the two cannot share one
# database: both keep their schema version in a table named alembic_version). For machines that share a
# study, see docs/gpu.md. Stop it: scripts/stop_postgres.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGDIR="${AUTOTUNE_PG_DIR:-$ROOT/.cache/postgres}"
DATA="$PGDIR/data"
PGUSER_NAME="autotune"
PGDB_NAME="autotune"
DEFAULT_PORT=55432

log() { echo "start_postgres: $*" >&2; }

find_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir
        return
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$dir/initdb" ]] && { echo "$dir"; return; }
    done
    return 1
}

install_postgres() {
    log "PostgreSQL is not installed; installing Debian's postgresql package"
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq postgresql >&2
    # Debian's package may start its own cluster on 5432; ours is separate and needs none of it.
}

BIN="$(find_bindir)" || { install_postgres; BIN="$(find_bindir)"; }

# PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` system user.
RUN=()
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    RUN=(runuser -u postgres --)
fi
as_owner() { "${RUN[@]}" "$@"; }

mkdir -p "$PGDIR"
[[ ${#RUN[@]} -gt 0 ]] && chown postgres: "$PGDIR"

port_free() {
    python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

MLFLOW_DB_NAME="mlflow"

url_for() { echo "postgresql://$PGUSER_NAME@127.0.0.1:$1/$PGDB_NAME"; }

create_databases() {
    local db
    for db in "$PGDB_NAME" "$MLFLOW_DB_NAME"; do
        if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$1" -U "$PGUSER_NAME" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
            as_owner "$BIN/createdb" -h 127.0.0.1 -p "$1" -U "$PGUSER_NAME" "$db"
        fi
    done
    log "Optuna studies: $(url_for "$1"); MLflow server store: postgresql://$PGUSER_NAME@127.0.0.1:$1/$MLFLOW_DB_NAME"
}

if [[ -f "$DATA/PG_VERSION" ]] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    PORT="$(cat "$PGDIR/port")"
    log "already running on port $PORT (data $DATA)"
    create_databases "$PORT"
    url_for "$PORT"
    exit 0
fi

if [[ -n "${AUTOTUNE_PG_PORT:-}" ]]; then
    PORT="$AUTOTUNE_PG_PORT"
elif [[ -f "$PGDIR/port" ]] && port_free "$(cat "$PGDIR/port")"; then
    PORT="$(cat "$PGDIR/port")"
elif port_free "$DEFAULT_PORT"; then
    PORT="$DEFAULT_PORT"
else
    PORT="$(free_port)"
fi
if ! port_free "$PORT"; then
    log "port $PORT on 127.0.0.1 is taken by another program; set AUTOTUNE_PG_PORT to a free port"
    exit 1
fi

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "creating a cluster in $DATA"
    as_owner "$BIN/initdb" --pgdata="$DATA" --username="$PGUSER_NAME" --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 >"$PGDIR/initdb.log" 2>&1 \
        || { cat "$PGDIR/initdb.log" >&2; exit 1; }
fi

echo "$PORT" >"$PGDIR/port"
log "starting on 127.0.0.1:$PORT (log $PGDIR/server.log)"
# Socket in the cluster dir (not /var/run/postgresql, which may not exist or be writable).
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$PGDIR/server.log" -w -t 60 start \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $PGDIR -c max_connections=200" >&2 \
    || { tail -20 "$PGDIR/server.log" >&2; exit 1; }

create_databases "$PORT"
url_for "$PORT"
