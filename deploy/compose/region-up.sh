#!/usr/bin/env bash
# Brings a region back after region-down.sh (either mode): starts its stopped
# containers, reconnects them to cairn-wan under their service names, then
# waits (bounded) until the cluster shows a leader and the region's nodes up.
#   deploy/compose/region-up.sh [--timeout SECONDS] REGION
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

timeout_s=120 region=""
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout_s=${2:?--timeout needs a number of seconds}; shift ;;
    -*) die "usage: $0 [--timeout SECONDS] REGION" ;;
    *) [ -z "$region" ] || die "one region at a time"; region=$1 ;;
  esac
  shift
done
[ -n "$region" ] || die "usage: $0 [--timeout SECONDS] REGION"

nodes=$(region_nodes "$region")
for id in $nodes; do
  container=cairn-node-$id
  if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
    docker start "$container" >/dev/null
    log "started $container (region $region)"
  fi
  if ! docker inspect -f '{{json .NetworkSettings.Networks}}' "$container" | grep -q '"cairn-wan"'; then
    # The service name is the address the other nodes know this node by;
    # a plain reconnect would drop that alias.
    docker network connect --alias "node-$id" cairn-wan "$container"
    log "reconnected $container (region $region) to cairn-wan"
  fi
done
log "waiting up to ${timeout_s}s for nodes $nodes to be up"
# shellcheck disable=SC2086 # one id per word
wait_nodes_up "$timeout_s" $nodes
log "region $region is back"
