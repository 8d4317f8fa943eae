#!/usr/bin/env bash
# Ray head of the lab cluster: GCS, dashboard and job server. The sweep drivers run here (as Ray
# Jobs); trials run wherever CPUs and GPUs are free, so the compose file gives the head no CPUs
# (RAY_NUM_CPUS=0) and leaves the work to the workers.
#
# Settings: RAY_AUTH_TOKEN (required), RAY_GCS_PORT (6379), RAY_DASHBOARD_HOST (0.0.0.0),
# RAY_DASHBOARD_PORT (8265), RAY_CLIENT_SERVER_PORT, RAY_TEMP_DIR, and those of every node
# (common.sh: RAY_NUM_CPUS, RAY_NODE_IP_ADDRESS, pinned ports). Extra arguments go to `ray start`.
set -euo pipefail
ROLE=ray-head
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

use_ray_token_auth
ensure_shared_dirs

args=(
    --head --block --disable-usage-stats
    --port="${RAY_GCS_PORT:-6379}"
    --dashboard-host="${RAY_DASHBOARD_HOST:-0.0.0.0}"
    --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
)
[ -n "${RAY_CLIENT_SERVER_PORT:-}" ] && args+=(--ray-client-server-port="$RAY_CLIENT_SERVER_PORT")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
ray_node_flags args

log "starting the Ray head: ray start ${args[*]} $*"
exec ray start "${args[@]}" "$@"
