#!/usr/bin/env bash
# The l0sweep API (`l0sweep serve`) joined to the cluster's Ray head and MLflow server.
#
# Settings: L0SWEEP_TOKEN (required: every request but /healthz must carry it as a bearer token),
# RAY_AUTH_TOKEN (required, the cluster's), L0SWEEP_RAY_ADDRESS (the head's dashboard,
# http://ray-head:8265), L0SWEEP_TRACKING_URI (http://mlflow:5000; trials on every node use it),
# L0SWEEP_HOST (0.0.0.0), L0SWEEP_PORT (8000), L0SWEEP_MLFLOW_RETRY_WINDOW_S (300; passed to every
# sweep's driver and trials) and the rest of service.settings.Settings.
set -euo pipefail
ROLE=api
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

require_env L0SWEEP_TOKEN "the API's bearer token (set it in docker/.env; clients send 'Authorization: Bearer <token>')"
use_ray_token_auth
ensure_shared_dirs
export L0SWEEP_RAY_ADDRESS=${L0SWEEP_RAY_ADDRESS:-http://ray-head:8265}
export L0SWEEP_TRACKING_URI=${L0SWEEP_TRACKING_URI:-http://mlflow:5000}
export L0SWEEP_HOST=${L0SWEEP_HOST:-0.0.0.0} L0SWEEP_PORT=${L0SWEEP_PORT:-8000}

wait_for "MLflow at $L0SWEEP_TRACKING_URI" "is the mlflow service healthy (docker compose ps mlflow)?" \
    http "${L0SWEEP_TRACKING_URI%/}/health"
wait_for "the Ray head's dashboard at $L0SWEEP_RAY_ADDRESS" "is the ray-head service healthy (docker compose ps ray-head)?" \
    http "${L0SWEEP_RAY_ADDRESS%/}/api/gcs_healthz"

log "starting the API on $L0SWEEP_HOST:$L0SWEEP_PORT"
exec l0sweep serve --host "$L0SWEEP_HOST" --port "$L0SWEEP_PORT" \
    --ray-address "$L0SWEEP_RAY_ADDRESS" --mlflow-uri "$L0SWEEP_TRACKING_URI" "$@"
