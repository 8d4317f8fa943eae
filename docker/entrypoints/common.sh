# shellcheck shell=bash
# Shared by the entrypoints of the l0sweep image (sourced, never run): logging, required settings,
# bounded waits for dependencies, and the Ray flags every node understands.
#
# Waits give up after L0SWEEP_WAIT_TIMEOUT_S seconds (default 180), trying every
# L0SWEEP_WAIT_INTERVAL_S seconds (default 2); a probe that finds a fault retrying cannot fix (a
# refused password) gives up at once. The container then exits non-zero and its restart policy
# (or the admin) takes over, with the reason as the last line of `docker compose logs SERVICE`.

ENTRYPOINTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${L0SWEEP_PYTHON:-python}
WAIT_TIMEOUT_S=${L0SWEEP_WAIT_TIMEOUT_S:-180}
WAIT_INTERVAL_S=${L0SWEEP_WAIT_INTERVAL_S:-2}

log() {
    printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${ROLE:-l0sweep}" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

probe() {
    "$PYTHON" "$ENTRYPOINTS/probe.py" "$@"
}

# require_env NAME WHY: exit with WHY unless NAME is set and not empty.
require_env() {
    [ -n "${!1:-}" ] || die "$1 is not set: $2"
}

# Ray token authentication, on for every node and the API: they must all hold the same token.
use_ray_token_auth() {
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && { [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] || [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; }; then
        die "no Ray auth token: set RAY_AUTH_TOKEN (the same on every Ray node and the API;" \
            "e.g. 'openssl rand -hex 32' into docker/.env) or RAY_AUTH_TOKEN_PATH to a file holding it"
    fi
    export RAY_AUTH_MODE=token
}

# wait_for WHAT HINT PROBE_ARGS...: run `probe PROBE_ARGS` until it succeeds (exit 0), gives up
# (exit 3) or the time runs out.
wait_for() {
    local what=$1 hint=$2 attempt=0 start=$SECONDS status elapsed
    shift 2
    log "waiting for $what (at most $WAIT_TIMEOUT_S s)"
    while :; do
        attempt=$((attempt + 1))
        status=0
        probe "$@" || status=$?
        elapsed=$((SECONDS - start))
        if [ "$status" -eq 0 ]; then
            log "$what is up after $elapsed s"
            return 0
        fi
        [ "$status" -eq 3 ] && die "$what refused us; $hint"
        if [ "$elapsed" -ge "$WAIT_TIMEOUT_S" ]; then
            die "$what did not answer within $WAIT_TIMEOUT_S s ($attempt attempts); $hint"
        fi
        [ $((attempt % 10)) -eq 0 ] && log "still waiting for $what ($elapsed s so far)"
        sleep "$WAIT_INTERVAL_S"
    done
}

# ensure_dir PATH WHAT: create PATH if missing; exit unless this user can write it.
ensure_dir() {
    mkdir -p "$1" 2>/dev/null || true
    if [ ! -d "$1" ] || [ ! -w "$1" ]; then
        die "$2 $1 is not a directory that user $(id -un) (uid $(id -u)) can write:" \
            "give the volume or bind mount to that uid (chown -R $(id -u):$(id -g) on the host)"
    fi
}

# ray_node_flags ARRAY: append to the array named ARRAY the `ray start` flags set by environment
# variables (unset or empty ones are left to Ray's defaults). Pinned ports are what a firewall
# between hosts needs; several nodes on one host need distinct agent ports.
ray_node_flags() {
    local -n flags_out=$1
    local pair var flag
    for pair in \
        RAY_NUM_CPUS:--num-cpus RAY_NUM_GPUS:--num-gpus RAY_NODE_IP_ADDRESS:--node-ip-address \
        RAY_OBJECT_STORE_MEMORY:--object-store-memory \
        RAY_NODE_MANAGER_PORT:--node-manager-port RAY_OBJECT_MANAGER_PORT:--object-manager-port \
        RAY_DASHBOARD_AGENT_LISTEN_PORT:--dashboard-agent-listen-port \
        RAY_DASHBOARD_AGENT_GRPC_PORT:--dashboard-agent-grpc-port \
        RAY_RUNTIME_ENV_AGENT_PORT:--runtime-env-agent-port \
        RAY_METRICS_EXPORT_PORT:--metrics-export-port \
        RAY_MIN_WORKER_PORT:--min-worker-port RAY_MAX_WORKER_PORT:--max-worker-port; do
        var=${pair%%:*}
        flag=${pair#*:}
        if [ -n "${!var:-}" ]; then
            flags_out+=("$flag=${!var}")
        fi
    done
}

# Data and Tune results live on storage shared by every node (a volume, or NFS across hosts).
ensure_shared_dirs() {
    if [ -n "${L0SWEEP_STORAGE_PATH:-}" ]; then
        ensure_dir "$L0SWEEP_STORAGE_PATH" "the Tune storage path (L0SWEEP_STORAGE_PATH)"
    fi
    if [ -n "${L0SWEEP_DATA_DIR:-}" ]; then
        mkdir -p "$L0SWEEP_DATA_DIR" 2>/dev/null || true
        [ -d "$L0SWEEP_DATA_DIR" ] || die "the data directory (L0SWEEP_DATA_DIR) $L0SWEEP_DATA_DIR does not exist"
    fi
}
