#!/usr/bin/env bash
# Cairn against restic on the same machine, same data, one run:
#   SRC=DIR [GEN=.../gen_chat_dataset.py] [SMALL_FILES=100000] deploy/local/bench.sh
# Cairn runs on a real local cluster (six cairn-node processes, 3 regions,
# 4+2, fsync on, TLS); restic (when installed) backs up to a local
# repository. Phases: full backup, restore, then with GEN a 1% mutation, an
# incremental backup and a second restore; then SMALL_FILES files of
# 100-2,000 bytes (0 skips them). Every restore is compared byte for byte
# (diff -r); a difference fails the script. Each phase line gives wall time,
# MB/s, CPU seconds of the client and of all six nodes, and peak RSS. The
# closing table puts both tools side by side with the ratio (restic's time
# over Cairn's: above 1 means Cairn is faster).
# RESTIC=0 skips restic; CAIRN_BUILD=0 uses the release binaries as built.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SRC:?set SRC to a dataset directory}"
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/cairn-bench}
GEN=${GEN:-}
SMALL_FILES=${SMALL_FILES:-100000}
BIN=target/release
RESTIC=${RESTIC:-1}
command -v restic >/dev/null 2>&1 || RESTIC=0
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
export RESTIC_PASSWORD=bench-only-password RESTIC_REPOSITORY=$SCRATCH/restic-repo
export RESTIC_CACHE_DIR=$SCRATCH/restic-cache
for _ in $(seq 1 100); do "$BIN/cairn" cluster status --json >/dev/null 2>&1 && break; sleep 0.2; done
"$BIN/cairn" init >/dev/null

node_pids() { cat "$SCRATCH"/cluster/node-*.pid; }
node_cpu_ticks() { # utime + stime of every node, in clock ticks
  local sum=0
  for pid in $(node_pids); do
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}
node_rss_kb() { # highest VmHWM over the node processes
  local max=0
  for pid in $(node_pids); do
    local kb; kb=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${kb:-0}" -gt "$max" ] && max=$kb
  done
  echo "$max"
}
TICKS=$(getconf CLK_TCK)
RESULTS=$SCRATCH/results
: >"$RESULTS"
# phase TOOL NAME BYTES COMMAND...: runs it, prints its line, records
# "tool name wall mbps client_cpu node_cpu client_rss_mib node_rss_mib".
phase() {
  local tool=$1 name=$2 bytes=$3; shift 3
  sync; sleep 1 # a quiet start: no writeback of the previous phase
  local before=0; [ "$tool" = cairn ] && before=$(node_cpu_ticks)
  /usr/bin/time -f "%e %U %S %M" -o "$SCRATCH/time" "$@" >"$SCRATCH/phase.log" 2>&1 || {
    cat "$SCRATCH/phase.log" >&2; echo "$tool $name failed" >&2; exit 1
  }
  local wall user sys rss node_cpu=0 node_rss=0
  read -r wall user sys rss <"$SCRATCH/time"
  if [ "$tool" = cairn ]; then
    node_cpu=$(echo "($(node_cpu_ticks) - $before) / $TICKS" | bc -l)
    node_rss=$(($(node_rss_kb) / 1024))
  fi
  local mbps client_cpu
  mbps=$(echo "$bytes / 1000000 / $wall" | bc -l)
  client_cpu=$(echo "$user + $sys" | bc -l)
  printf '%-7s %-12s %7.2fs %8.1f MB/s  CPU client %6.2fs nodes %6.2fs  RSS client %4d MiB nodes %4d MiB\n' \
    "$tool" "$name" "$wall" "$mbps" "$client_cpu" "$node_cpu" $((rss / 1024)) "$node_rss"
  echo "$tool $name $wall $mbps $client_cpu $node_cpu $((rss / 1024)) $node_rss" >>"$RESULTS"
}
same() { # same DIR_A DIR_B: byte for byte, or the script fails
  diff -r "$1" "$2" >/dev/null || { echo "RESTORE DIFFERS: $1 vs $2" >&2; exit 1; }
}

cp -a "$SRC" "$SCRATCH/data"
BYTES=$(du -sb "$SCRATCH/data" | cut -f1)
echo "dataset: $((BYTES / 1000000)) MB, $(find "$SCRATCH/data" -type f | wc -l) files"
[ "$RESTIC" = 1 ] && cp -a "$SRC" "$SCRATCH/rdata"

phase cairn backup "$BYTES" "$BIN/cairn" backup "$SCRATCH/data" --dataset chat
phase cairn restore "$BYTES" "$BIN/cairn" restore latest --dataset chat --target "$SCRATCH/restore"
same "$SCRATCH/data" "$SCRATCH/restore/data"
if [ "$RESTIC" = 1 ]; then
  restic init >/dev/null
  (cd "$SCRATCH" && phase restic backup "$BYTES" restic backup rdata)
  phase restic restore "$BYTES" restic restore latest --target "$SCRATCH/rrestore"
  same "$SCRATCH/rdata" "$SCRATCH/rrestore/rdata"
fi
if [ -n "$GEN" ]; then
  python3 "$GEN" mutate "$SCRATCH/data" --percent 1 --seed 2 >/dev/null
  BYTES=$(du -sb "$SCRATCH/data" | cut -f1)
  phase cairn incremental "$BYTES" "$BIN/cairn" backup "$SCRATCH/data" --dataset chat
  rm -rf "$SCRATCH/restore"
  phase cairn restore2 "$BYTES" "$BIN/cairn" restore latest --dataset chat --target "$SCRATCH/restore"
  same "$SCRATCH/data" "$SCRATCH/restore/data"
  if [ "$RESTIC" = 1 ]; then
    python3 "$GEN" mutate "$SCRATCH/rdata" --percent 1 --seed 2 >/dev/null
    same "$SCRATCH/data" "$SCRATCH/rdata" # both tools back up the same tree
    (cd "$SCRATCH" && phase restic incremental "$BYTES" restic backup rdata)
    rm -rf "$SCRATCH/rrestore"
    phase restic restore2 "$BYTES" restic restore latest --target "$SCRATCH/rrestore"
    same "$SCRATCH/rdata" "$SCRATCH/rrestore/rdata"
  fi
fi
shards=$(du -sb "$SCRATCH"/cluster/node-*/shards | awk '{s+=$1} END {printf "%d", s}')
echo "stored: Cairn $((shards / 1000000)) MB of 4+2 shards"
echo "cairn stored $shards" >>"$RESULTS"
if [ "$RESTIC" = 1 ]; then
  repo=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
  echo "stored: restic $((repo / 1000000)) MB (one copy)"
  echo "restic stored $repo" >>"$RESULTS"
fi

if [ "$SMALL_FILES" -gt 0 ]; then
  # One short chat log per room and hour: 100-2,000 bytes each, deterministic.
  python3 - "$SCRATCH/small" "$SMALL_FILES" <<'PY'
import os, random, sys
root, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
words = ["hello", "gg", "lol", "nice", "stream", "666", "哈哈哈", "主播", "礼物", "🔥", "❤️"]
for i in range(count):
    d = os.path.join(root, f"room={i // 500:05d}")
    os.makedirs(d, exist_ok=True)
    size, lines = rng.randint(100, 2000), []
    while sum(map(len, lines)) < size:
        lines.append('{"ts":%d,"user":%d,"text":"%s"}\n' % (
            1700000000000 + rng.randint(0, 10**9), rng.randint(1, 10**6),
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))))
    with open(os.path.join(d, f"{i % 500:03d}.jsonl"), "w") as f:
        f.write("".join(lines)[:size])
PY
  SBYTES=$(du -sb --apparent-size "$SCRATCH/small" | cut -f1)
  echo "small files: $SMALL_FILES files, $((SBYTES / 1000000)) MB"
  phase cairn small-backup "$SBYTES" "$BIN/cairn" backup "$SCRATCH/small" --dataset small
  phase cairn small-restore "$SBYTES" "$BIN/cairn" restore latest --dataset small --target "$SCRATCH/small-restore"
  same "$SCRATCH/small" "$SCRATCH/small-restore/small"
  if [ "$RESTIC" = 1 ]; then
    (cd "$SCRATCH" && phase restic small-backup "$SBYTES" restic backup small)
    phase restic small-restore "$SBYTES" restic restore latest --path "$SCRATCH/small" --target "$SCRATCH/small-rrestore"
    same "$SCRATCH/small" "$SCRATCH/small-rrestore/small"
  fi
fi

# The table: both tools' figures and restic/Cairn (above 1: Cairn is faster
# or smaller). CPU is seconds per GB of the phase's input.
python3 - "$RESULTS" "$BYTES" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows[(f[0], f[1])] = f[2:]
print()
print("| figure | restic | Cairn | restic / Cairn | Cairn CPU s/GB (client + nodes) | Cairn peak RSS (client / node) |")
print("|---|---|---|---|---|---|")
for name in ["backup", "restore", "incremental", "restore2", "small-backup", "small-restore"]:
    c, r = rows.get(("cairn", name)), rows.get(("restic", name))
    if not c:
        continue
    wall = float(c[0]); mb_s = float(c[1]); gb = wall * mb_s / 1000
    cpu = f"{float(c[2]) / gb:.2f} + {float(c[3]) / gb:.2f}"
    rss = f"{c[4]} / {c[5]} MiB"
    rw = f"{float(r[0]):.2f} s" if r else "-"
    ratio = f"{float(r[0]) / wall:.2f}x" if r else "-"
    print(f"| {name} | {rw} | {wall:.2f} s | {ratio} | {cpu} | {rss} |")
c, r = rows.get(("cairn", "stored")), rows.get(("restic", "stored"))
if c:
    cs = int(c[0]) / 1e6
    rs = f"{int(r[0]) / 1e6:.0f} MB (one copy)" if r else "-"
    ratio = f"{int(c[0]) / int(r[0]):.2f}x of restic" if r else "-"
    print(f"| stored | {rs} | {cs:.0f} MB of 4+2 shards | {ratio} | | |")
PY
