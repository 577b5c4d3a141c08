#!/usr/bin/env bash
# Takes one region of the compose deployment away.
#   deploy/compose/region-down.sh [--stop | --partition] REGION
#   --stop       (default) stop the region's containers with SIGTERM: a
#                region outage; their volumes keep the data
#   --partition  disconnect the region's containers from the cairn-wan
#                network: they keep running and keep talking to each other
#                over their region network, but nobody outside the region
#                reaches them and they reach nobody outside it
# region-up.sh undoes either.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

mode=stop region=""
while [ $# -gt 0 ]; do
  case $1 in
    --stop) mode=stop ;;
    --partition) mode=partition ;;
    -*) die "usage: $0 [--stop | --partition] REGION" ;;
    *) [ -z "$region" ] || die "one region at a time"; region=$1 ;;
  esac
  shift
done
[ -n "$region" ] || die "usage: $0 [--stop | --partition] REGION"

for id in $(region_nodes "$region"); do
  container=cairn-node-$id
  case $mode in
    stop)
      docker stop --time 30 "$container" >/dev/null
      log "stopped $container (region $region)"
      ;;
    partition)
      docker network disconnect cairn-wan "$container"
      log "disconnected $container (region $region) from cairn-wan"
      ;;
  esac
done
