#!/usr/bin/env bash
# Garbage collection figures on a local 3-region cluster of real processes:
# bytes reclaimed against bytes forgotten, prune time, and the throughput of
# a backup running while the prune does.
#   deploy/local/prune-figures.sh [MB]     # MB of incompressible data per dataset (200)
# Needs jq. Builds the release binaries (CAIRN_BUILD=0: use those present).
set -euo pipefail
cd "$(dirname "$0")/../.."
MB=${1:-200}
D=${TMPDIR:-/tmp}/cairn-prune-figures
rm -rf "$D" && mkdir -p "$D"
export CAIRN_LOCAL_DIR=$D/cluster
deploy/local/cluster.sh start "$D/cluster" >/dev/null
trap 'deploy/local/cluster.sh stop >/dev/null 2>&1 || true' EXIT
export CAIRN_CLUSTER=127.0.0.1:7101,127.0.0.1:7201,127.0.0.1:7301
export CAIRN_CA=$D/cluster/tls/ca.pem CAIRN_TOKEN
CAIRN_TOKEN=$(cat "$D/cluster/tls/bootstrap-token")
export CAIRN_PASSWORD=prune-figures
C=target/release/cairn
for _ in $(seq 1 60); do $C cluster status --json >/dev/null 2>&1 && break; sleep 1; done
$C init >/dev/null
for s in 1 2 3; do mkdir -p "$D/src$s"; head -c $((MB * 1000000)) /dev/urandom >"$D/src$s/data.bin"; done
g1=$($C backup "$D/src1" --dataset g1 --json | jq -r .snapshot_id)
g2=$($C backup "$D/src2" --dataset g2 --json | jq -r .snapshot_id)
alone=$($C backup "$D/src3" --dataset live --json | jq -c '{bytes, duration_s}')
before=$($C stats --json | jq -c '{stored_bytes, pack_bytes}')
$C forget "$g1" "$g2" >/dev/null
head -c $((MB * 1000000)) /dev/urandom >"$D/src3/data.bin"
started=$(date +%s.%N)
$C prune --json >"$D/prune.json" &
prune=$!
during=$($C backup "$D/src3" --dataset live --json | jq -c '{bytes, duration_s}')
wait $prune
prune_s=$(echo "$(date +%s.%N) - $started" | bc)
after=$($C stats --json | jq -c '{stored_bytes, pack_bytes}')
jq -n --argjson alone "$alone" --argjson during "$during" --argjson before "$before" \
  --argjson after "$after" --slurpfile prune "$D/prune.json" --arg prune_s "$prune_s" --arg forgotten $((2 * MB * 1000000)) \
  '{forgotten_bytes: ($forgotten | tonumber), prune: $prune[0], prune_wall_s: ($prune_s | tonumber),
    stats_before: $before, stats_after: $after,
    backup_alone: $alone, backup_during_prune: $during}'
