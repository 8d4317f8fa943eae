#!/usr/bin/env bash
# Run one benchmark set of benchmarks/specs/ through a running l0sweep service, then write its
# report from MLflow:  benchmarks/run_set.sh SET [OUT_DIR]   (SET: digits, fashion-mlp, ...)
#
# Stage 1 is the dense sweep (the later ones start from it); stage 2 submits the sparse methods
# together, up to the service's concurrent-sweep limit, and waits for all of them. The service is
# L0SWEEP_URL (default http://127.0.0.1:8000), with L0SWEEP_TOKEN if it needs one.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:?usage: benchmarks/run_set.sh SET [OUT_DIR]}
OUT=${2:-docs/results/$SET}
DIR=benchmarks/specs/$SET
[ -d "$DIR" ] || { echo "no benchmark set $DIR; sets: $(ls benchmarks/specs)" >&2; exit 2; }
L0SWEEP=${L0SWEEP:-.venv/bin/l0sweep}

start=$(date +%s)
echo "== $SET: stage 1, dense"
$L0SWEEP submit "$DIR/dense.yaml" --wait
echo "== $SET: stage 2, the sparse methods"
ids=()
for spec in "$DIR"/*.yaml; do
    [ "$(basename "$spec")" = dense.yaml ] && continue
    until out=$($L0SWEEP submit "$spec" 2>&1); do
        case "$out" in
            *429*|*"concurrent"*) sleep 20 ;;  # the service's limit: wait for a slot
            *) echo "$out" >&2; exit 1 ;;
        esac
    done
    id=$(grep -oE '[0-9a-f]{32}' <<<"$out" | head -1)
    echo "submitted $(basename "$spec") as $id"
    ids+=("$id")
done
for id in "${ids[@]}"; do
    # the whole output first: a reader that stops early would break the CLI's pipe
    while status=$($L0SWEEP status "$id") && grep -qE ': (PENDING|RUNNING)' <<<"$status"; do
        sleep 15
    done
    echo "$status"
done
echo "== $SET: $(( $(date +%s) - start )) s in all; report in $OUT"
$L0SWEEP report --name "$SET-" --out "$OUT"
