#!/usr/bin/env bash
# MLflow tracking server of the lab cluster: runs and metrics in PostgreSQL, artifacts on a volume
# served by the server itself (clients upload and download through it: no shared disk needed).
#
# Needs POSTGRES_PASSWORD; POSTGRES_HOST/PORT/USER/DB default to postgres/5432/mlflow/mlflow.
# MLFLOW_DB_UPGRADE=true migrates an existing database to this MLflow version first (back it up
# before: see the README). The job runner stays off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION):
# l0sweep does not use it, and it costs about 1.8 GB of memory.
set -euo pipefail
ROLE=mlflow
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

require_env POSTGRES_PASSWORD "the MLflow database's password (set it in docker/.env)"
export POSTGRES_HOST=${POSTGRES_HOST:-postgres} POSTGRES_PORT=${POSTGRES_PORT:-5432}
export POSTGRES_USER=${POSTGRES_USER:-mlflow} POSTGRES_DB=${POSTGRES_DB:-mlflow}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}  # labs: no usage data leaves
MLFLOW_HOST=${MLFLOW_HOST:-0.0.0.0}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
export MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}

# The URI goes through the environment, never argv, where `ps` would show the password.
if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
    MLFLOW_BACKEND_STORE_URI=$("$PYTHON" -c '
import os
from urllib.parse import quote
e = os.environ
print("postgresql+psycopg2://%s:%s@%s:%s/%s" % (quote(e["POSTGRES_USER"], safe=""),
      quote(e["POSTGRES_PASSWORD"], safe=""), e["POSTGRES_HOST"], e["POSTGRES_PORT"],
      quote(e["POSTGRES_DB"], safe="")))')
fi
export MLFLOW_BACKEND_STORE_URI

wait_for "PostgreSQL at $POSTGRES_HOST:$POSTGRES_PORT (database $POSTGRES_DB)" \
    "check POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB against the postgres service (a password changed in .env after the first start does not change the database's: see the README)" \
    postgres
case "$MLFLOW_ARTIFACTS_DESTINATION" in
    *://*) ;;
    *) ensure_dir "$MLFLOW_ARTIFACTS_DESTINATION" "the artifact store (MLFLOW_ARTIFACTS_DESTINATION)" ;;
esac

if [ "${MLFLOW_DB_UPGRADE:-false}" = "true" ]; then
    log "migrating the MLflow database to this MLflow version (MLFLOW_DB_UPGRADE=true)"
    mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"
fi

log "starting mlflow server on $MLFLOW_HOST:$MLFLOW_PORT ($MLFLOW_WORKERS workers), artifacts in $MLFLOW_ARTIFACTS_DESTINATION"
exec mlflow server --serve-artifacts --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
    --workers "$MLFLOW_WORKERS" "$@"
