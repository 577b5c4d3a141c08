#!/usr/bin/env bash
# Starts a real 3-region cluster of cairn-node processes on loopback:
# regions r1, r2, r3 with two nodes each, erasure 4+2, data under $DIR.
#   deploy/local/cluster.sh start [DIR]   # builds release binaries first
#   deploy/local/cluster.sh stop-region r1
#   deploy/local/cluster.sh start-region r1
#   deploy/local/cluster.sh stop           # returns once the nodes have exited
# CAIRN_BUILD=0 uses the binaries already in target/release; CAIRN_NODE_CONFIG
# (a TOML file), CAIRN_DOWN_AFTER and CAIRN_METRICS_BASE (metrics on port
# base+id) pass settings to every node. Nodes speak mutual TLS with a CA and
# node certificates made by `cairn-node ca` under $DIR/tls, and $DIR/tls/
# bootstrap-token becomes the first cluster-admin token; the `start` output
# says what to export for the CLI (CAIRN_CA, CAIRN_TOKEN). CAIRN_INSECURE=1
# runs plaintext without authentication instead. CAIRN_COLD_NODES=1 at `start`
# adds one `--storage-class cold` node per region (ids 7-9, ports 7103, 7203,
# 7303) for hot/cold tiering; later commands on the same $DIR remember it.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${CAIRN_LOCAL_DIR:-${TMPDIR:-/tmp}/cairn-local}
[ "${1:-}" = start ] && [ -n "${2:-}" ] && DIR=$2
BIN=target/release/cairn-node
NODES=(1=r1@127.0.0.1:7101 2=r1@127.0.0.1:7102 3=r2@127.0.0.1:7201 4=r2@127.0.0.1:7202 5=r3@127.0.0.1:7301 6=r3@127.0.0.1:7302)
COLD=(7=r1@127.0.0.1:7103 8=r2@127.0.0.1:7203 9=r3@127.0.0.1:7303)
if [ "${CAIRN_COLD_NODES:-0}" = 1 ] || [ -f "$DIR/cold-nodes" ]; then NODES+=("${COLD[@]}"); fi
CLUSTER=$(IFS=,; echo "${NODES[*]}")

# The CA and token, once per $DIR (existing files are kept).
make_tls() {
  local tls=$DIR/tls
  mkdir -p "$tls"
  [ -f "$tls/ca.pem" ] || "$BIN" ca init --out "$tls" >/dev/null
  if [ ! -s "$tls/bootstrap-token" ]; then
    (umask 077 && printf 'cairn_%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$tls/bootstrap-token")
  fi
}

start_node() { # id=region@addr
  local spec=$1 id=${1%%=*} rest=${1#*=}
  local region=${rest%%@*} addr=${rest#*@}
  mkdir -p "$DIR/node-$id"
  local extra=()
  if [ "${CAIRN_INSECURE:-0}" = 1 ]; then
    extra+=(--insecure)
  else
    local tls=$DIR/tls
    [ -f "$tls/node-$id.pem" ] || "$BIN" ca issue --ca "$tls" --node-id "$id" --region "$region" \
      --host "${addr%:*},localhost" --out "$tls" >/dev/null
    extra+=(--tls-ca "$tls/ca.pem" --tls-cert "$tls/node-$id.pem" --tls-key "$tls/node-$id.key"
      --bootstrap-token-file "$tls/bootstrap-token")
  fi
  if [ -n "${CAIRN_NODE_CONFIG:-}" ]; then extra+=(--config "$CAIRN_NODE_CONFIG"); fi
  if [ -n "${CAIRN_DOWN_AFTER:-}" ]; then extra+=(--down-after "$CAIRN_DOWN_AFTER"); fi
  if [[ " ${COLD[*]} " == *" $spec "* ]]; then extra+=(--storage-class cold); fi
  if [ -n "${CAIRN_METRICS_BASE:-}" ]; then extra+=(--metrics-listen "127.0.0.1:$((CAIRN_METRICS_BASE + id))"); fi
  "$BIN" --node-id "$id" --region "$region" --listen "$addr" --data-dir "$DIR/node-$id" \
    --initial-cluster "$CLUSTER" --erasure 4+2 "${extra[@]}" >>"$DIR/node-$id.log" 2>&1 &
  echo $! >"$DIR/node-$id.pid"
  echo "node $id ($region) on $addr, log $DIR/node-$id.log"
}
stop_node() { # SIGTERM; prints the pid so the caller can wait for the exit
  local id=$1
  if [ -f "$DIR/node-$id.pid" ]; then
    local pid; pid=$(cat "$DIR/node-$id.pid")
    if kill "$pid" 2>/dev/null; then echo "$pid"; fi
  fi
  rm -f "$DIR/node-$id.pid"
}
# Returns once every pid has exited, so the ports are free for the next
# start. A node's stop is bounded by its shutdown_grace (25 s by default).
wait_exited() {
  local pid
  for pid in "$@"; do
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

case "${1:-}" in
  start)
    [ "${CAIRN_BUILD:-1}" = 0 ] || cargo build --release --bin cairn-node --bin cairn
    mkdir -p "$DIR"
    if [ "${CAIRN_COLD_NODES:-0}" = 1 ]; then touch "$DIR/cold-nodes"; fi
    [ "${CAIRN_INSECURE:-0}" = 1 ] || make_tls
    for spec in "${NODES[@]}"; do start_node "$spec"; done
    echo "export CAIRN_CLUSTER=127.0.0.1:7101,127.0.0.1:7201,127.0.0.1:7301"
    if [ "${CAIRN_INSECURE:-0}" != 1 ]; then
      echo "export CAIRN_CA=$DIR/tls/ca.pem"
      echo "export CAIRN_TOKEN=\$(cat $DIR/tls/bootstrap-token)"
    fi
    ;;
  stop-region)
    pids=$(for spec in "${NODES[@]}"; do if [[ $spec == *"=$2@"* ]]; then stop_node "${spec%%=*}"; fi; done)
    # shellcheck disable=SC2086 # one pid per word
    wait_exited $pids ;;
  kill-region) # SIGKILL: no clean shutdown, as when a datacenter loses power
    for spec in "${NODES[@]}"; do
      [[ $spec == *"=$2@"* ]] || continue
      id=${spec%%=*}; if [ -f "$DIR/node-$id.pid" ]; then kill -9 "$(cat "$DIR/node-$id.pid")" 2>/dev/null || true; fi; rm -f "$DIR/node-$id.pid"
    done ;;
  kill-node)
    if [ -f "$DIR/node-$2.pid" ]; then kill -9 "$(cat "$DIR/node-$2.pid")" 2>/dev/null || true; fi; rm -f "$DIR/node-$2.pid" ;;
  start-region)
    for spec in "${NODES[@]}"; do if [[ $spec == *"=$2@"* ]]; then start_node "$spec"; fi; done ;;
  stop)
    pids=$(for spec in "${NODES[@]}"; do stop_node "${spec%%=*}"; done)
    # shellcheck disable=SC2086 # one pid per word
    wait_exited $pids ;;
  *) echo "usage: $0 start [DIR] | stop-region R | kill-region R | kill-node ID | start-region R | stop" >&2; exit 2 ;;
esac
