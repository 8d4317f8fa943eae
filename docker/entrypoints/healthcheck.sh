#!/usr/bin/env bash
# Health checks of the compose services: healthcheck.sh mlflow | ray-head | ray-worker | api.
# Each asks the process in its own container, on the port its entrypoint gave it.
set -euo pipefail
ROLE=healthcheck
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

case "${1:-}" in
    mlflow) url="http://127.0.0.1:${MLFLOW_PORT:-5000}/health" ;;
    ray-head) url="http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}/api/gcs_healthz" ;;
    ray-worker) url="http://127.0.0.1:${RAY_DASHBOARD_AGENT_LISTEN_PORT:-52365}/api/local_raylet_healthz" ;;
    api) url="http://127.0.0.1:${L0SWEEP_PORT:-8000}/healthz" ;;
    *) die "usage: healthcheck.sh mlflow|ray-head|ray-worker|api (got '${1:-}')" ;;
esac
probe http "$url" || { echo "unhealthy: $url did not answer 2xx" >&2; exit 1; }
