#!/usr/bin/env bash
# Measures Cairn on a real local cluster (six cairn-node processes, 3 regions,
# 4+2, fsync on) with the same phases as the peer benchmark scripts:
# full backup, restore, 1% mutate, incremental backup, restore latest.
#   SRC=/path/to/dataset GEN=/path/to/gen_chat_dataset.py deploy/local/bench.sh
# Prints one line per phase: wall seconds, MB/s, client max RSS, node max RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SRC:?set SRC to a dataset directory}"
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/cairn-bench}
GEN=${GEN:-}
BIN=target/release
rm -rf "$SCRATCH"; mkdir -p "$SCRATCH"
export CAIRN_LOCAL_DIR=$SCRATCH/cluster
[ "${CAIRN_BUILD:-1}" = 0 ] || cargo build --release --bin cairn-node --bin cairn
CAIRN_BUILD=0 deploy/local/cluster.sh start "$SCRATCH/cluster" >/dev/null
trap 'deploy/local/cluster.sh stop >/dev/null 2>&1 || true' EXIT
# The cluster's CA and bootstrap token (cluster.sh made them), for the CLI.
if [ "${CAIRN_INSECURE:-0}" != 1 ]; then
  export CAIRN_CA=$SCRATCH/cluster/tls/ca.pem
  CAIRN_TOKEN=$(cat "$SCRATCH/cluster/tls/bootstrap-token")
  export CAIRN_TOKEN
fi
export CAIRN_CLUSTER=127.0.0.1:7101,127.0.0.1:7201,127.0.0.1:7301
export CAIRN_PASSWORD=bench-only-password
for _ in $(seq 1 100); do "$BIN/cairn" cluster status --json >/dev/null 2>&1 && break; sleep 0.2; done
"$BIN/cairn" init >/dev/null
cp -a "$SRC" "$SCRATCH/data"
BYTES=$(du -sb "$SCRATCH/data" | cut -f1)

node_rss_kb() { # highest VmHWM over the node processes
  local max=0
  for pidfile in "$SCRATCH"/cluster/node-*.pid; do
    local kb; kb=$(awk '/VmHWM/ {print $2}' "/proc/$(cat "$pidfile")/status" 2>/dev/null || echo 0)
    [ "${kb:-0}" -gt "$max" ] && max=$kb
  done
  echo "$max"
}
phase() { # name bytes command...
  local name=$1 bytes=$2; shift 2
  /usr/bin/time -f "%e %M" -o "$SCRATCH/time" "$@" >/dev/null
  read -r wall rss <"$SCRATCH/time"
  printf '%-12s %8.2fs %8.1f MB/s  client max RSS %6d MiB  node max RSS %6d MiB\n' \
    "$name" "$wall" "$(echo "$bytes / 1000000 / $wall" | bc -l)" $((rss / 1024)) $(($(node_rss_kb) / 1024))
}
echo "dataset: $((BYTES / 1000000)) MB"
phase backup "$BYTES" "$BIN/cairn" backup "$SCRATCH/data" --dataset chat
phase restore "$BYTES" "$BIN/cairn" restore latest --dataset chat --target "$SCRATCH/restore"
diff -r "$SCRATCH/data" "$SCRATCH/restore/data" >/dev/null && echo "restore identical (diff -r)"
if [ -n "$GEN" ]; then
  python3 "$GEN" mutate "$SCRATCH/data" --percent 1 --seed 2 >/dev/null
  BYTES=$(du -sb "$SCRATCH/data" | cut -f1)
  phase incremental "$BYTES" "$BIN/cairn" backup "$SCRATCH/data" --dataset chat
  rm -rf "$SCRATCH/restore"
  phase restore2 "$BYTES" "$BIN/cairn" restore latest --dataset chat --target "$SCRATCH/restore"
fi
echo "stored on nodes: $(du -sb "$SCRATCH"/cluster/node-*/shards | awk '{s+=$1} END {print int(s/1000000)}') MB (4+2 shards)"
