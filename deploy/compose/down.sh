#!/usr/bin/env bash
# Removes the compose deployment entirely: containers (one-off client runs
# included), networks and the nodes' data volumes. Safe to run twice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

# A short grace period: the volumes go too, so a clean Raft shutdown buys
# nothing here, and nodes that lose quorum while the others stop take ~10 s.
compose --profile cli down --volumes --remove-orphans --timeout 10 >&2 || true
# Containers a killed `compose run` may have left behind, and networks that
# region-down.sh --partition reconnections could keep busy.
leftovers=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
if [ -n "$leftovers" ]; then
  # shellcheck disable=SC2086 # one id per word
  docker rm -f $leftovers >/dev/null
fi
for network in cairn-r1 cairn-r2 cairn-r3 cairn-wan; do
  docker network rm "$network" >/dev/null 2>&1 || true
done
log "compose deployment removed (containers, networks, volumes)"
