#!/usr/bin/env bash
# Failover figures on a real local cluster (six cairn-node processes, 3
# regions, 4+2): time from losing a region (SIGKILL) to the first successful
# restore and to the first acknowledged backup; re-protection throughput after
# losing a node; scrub rate; a drill report.
#   SRC=/path/to/dataset deploy/local/failover-figures.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SRC:?set SRC to a dataset directory}"
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/cairn-failover}
BIN=target/release
rm -rf "$SCRATCH"; mkdir -p "$SCRATCH"
cat >"$SCRATCH/node.toml" <<TOML
[repair]
interval = "1s"
rate_bytes_per_s = 0
[scrub]
interval = "1s"
rate_bytes_per_s = 0
TOML
export CAIRN_LOCAL_DIR=$SCRATCH/cluster CAIRN_NODE_CONFIG=$SCRATCH/node.toml CAIRN_DOWN_AFTER=5s CAIRN_METRICS_BASE=19100
[ "${CAIRN_BUILD:-1}" = 0 ] || cargo build --release --bin cairn-node --bin cairn
CAIRN_BUILD=0 deploy/local/cluster.sh start "$SCRATCH/cluster" >/dev/null
trap 'deploy/local/cluster.sh stop >/dev/null 2>&1 || true' EXIT
# The cluster's CA and bootstrap token (cluster.sh made them), for the CLI.
if [ "${CAIRN_INSECURE:-0}" != 1 ]; then
  export CAIRN_CA=$SCRATCH/cluster/tls/ca.pem
  CAIRN_TOKEN=$(cat "$SCRATCH/cluster/tls/bootstrap-token")
  export CAIRN_TOKEN
fi
export CAIRN_CLUSTER=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7301,127.0.0.1:7302
export CAIRN_PASSWORD=figures-only-password
for _ in $(seq 1 100); do "$BIN/cairn" cluster status --json >/dev/null 2>&1 && break; sleep 0.2; done
"$BIN/cairn" init >/dev/null
"$BIN/cairn" backup "$SRC" --dataset chat >/dev/null
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }
status() { "$BIN/cairn" cluster status --json; }
jqv() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

echo "== region r1 lost (SIGKILL of both nodes, one of them the first leader)"
t0=$(now)
deploy/local/cluster.sh kill-region r1
until "$BIN/cairn" restore latest --dataset chat --target "$SCRATCH/restore" >/dev/null 2>&1; do rm -rf "$SCRATCH/restore"; done
echo "first successful restore after $(since "$t0") s (includes the restore itself)"
diff -r "$SRC" "$SCRATCH/restore/$(basename "$SRC")" >/dev/null && echo "  restore identical"
t1=$(now)
mkdir -p "$SCRATCH/small"; echo "after the region loss" >"$SCRATCH/small/msg.txt"
until "$BIN/cairn" backup "$SCRATCH/small" --dataset live >/dev/null 2>&1; do :; done
echo "first acknowledged backup $(since "$t0") s after the loss ($(since "$t1") s after the restore)"
echo "== drill without r1 (the cluster is still without it)"
"$BIN/cairn" drill --without-region r1 --json
deploy/local/cluster.sh start-region r1 >/dev/null
until [ "$(status | jqv "all(n['up'] for n in d['nodes'])")" = True ]; do sleep 0.5; done
until [ "$(status | jqv "d['protection']['fully_protected'] == d['packs']")" = True ]; do sleep 0.5; done
echo "== all back and fully protected; now node 4 loses its disk"
t2=$(now)
deploy/local/cluster.sh kill-node 4
rm -rf "$SCRATCH/cluster/node-4"
until [ "$("$BIN/cairn" check --read-data --json 2>/dev/null | jqv "d['ok']")" = True ]; do sleep 0.5; done
took=$(since "$t2")
leader=$(status | jqv "d['leader']")
port=$((19100 + leader))
written=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^cairn_repair_written_bytes_total/ {print $2}')
echo "node 4 lost: check --read-data clean again after $took s (5 s of it is --down-after)"
leader_addr=$(status | jqv "[n['addr'] for n in d['nodes'] if n['node_id'] == d['leader']][0]")
echo "repair on the leader (node $leader): $written bytes of shards written in total"
CAIRN_CLUSTER=$leader_addr "$BIN/cairn" cluster status --json | jqv "d['repair']"
echo "== scrub rate (node 3, unlimited, one-second pauses between rounds)"
b=$(curl -s http://127.0.0.1:19103/metrics | awk '/^cairn_scrub_checked_bytes_total/ {print $2}')
sleep 10
a=$(curl -s http://127.0.0.1:19103/metrics | awk '/^cairn_scrub_checked_bytes_total/ {print $2}')
echo "scrub verified $(echo "($a - $b) / 10 / 1000000" | bc -l | xargs printf '%.1f') MB/s on node 3"
