#!/usr/bin/env bash
# Stop the private PostgreSQL cluster started by scripts/start_postgres.sh (its data stays; a later start
# reuses it). Idempotent: a cluster that is not running is left alone. AUTOTUNE_PG_DIR as for the start.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGDIR="${AUTOTUNE_PG_DIR:-$ROOT/.cache/postgres}"
DATA="$PGDIR/data"

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    echo "stop_postgres: no cluster in $DATA" >&2
    exit 0
fi
BIN="/usr/lib/postgresql/$(cat "$DATA/PG_VERSION")/bin"  # the server version that made this cluster
[[ -x "$BIN/pg_ctl" ]] || BIN="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
RUN=()
[[ $(id -u) -eq 0 ]] && RUN=(runuser -u postgres --)

if "${RUN[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    "${RUN[@]}" "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
else
    echo "stop_postgres: not running ($DATA)" >&2
fi
