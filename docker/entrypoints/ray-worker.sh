#!/usr/bin/env bash
# Ray worker node: joins the head at RAY_HEAD_ADDRESS (host:port of its GCS, default
# ray-head:6379) and offers its CPUs and GPUs to the trials. The same script joins a machine on
# another host (see the README, "Lab cluster").
#
# Settings: RAY_AUTH_TOKEN (required, the head's), RAY_HEAD_ADDRESS, RAY_DASHBOARD_AGENT_LISTEN_PORT
# (52365; the health check asks it), and those of every node (common.sh). Extra arguments go to
# `ray start`.
set -euo pipefail
ROLE=ray-worker
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

use_ray_token_auth
ensure_shared_dirs
RAY_HEAD_ADDRESS=${RAY_HEAD_ADDRESS:-ray-head:6379}
head_host=${RAY_HEAD_ADDRESS%:*}
head_port=${RAY_HEAD_ADDRESS##*:}
[ "$head_host" != "$RAY_HEAD_ADDRESS" ] || die "RAY_HEAD_ADDRESS=$RAY_HEAD_ADDRESS is not HOST:PORT (e.g. ray-head:6379)"

wait_for "the Ray head at $RAY_HEAD_ADDRESS" \
    "is the head running (docker compose ps ray-head)? From another host: is port $head_port open to this machine?" \
    tcp "$head_host" "$head_port"

export RAY_DASHBOARD_AGENT_LISTEN_PORT=${RAY_DASHBOARD_AGENT_LISTEN_PORT:-52365}
args=(--address="$RAY_HEAD_ADDRESS" --block --disable-usage-stats)
ray_node_flags args

log "joining the Ray cluster: ray start ${args[*]} $*"
exec ray start "${args[@]}" "$@"
