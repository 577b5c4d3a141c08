#!/usr/bin/env bash
# Starts the six-node, three-region compose deployment and waits (bounded)
# until `cairn cluster status` shows a leader and all six nodes up.
#   deploy/compose/up.sh [--build] [--timeout SECONDS]
# The image is built first when it does not exist yet, or always with --build.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

build=no timeout_s=120
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=yes ;;
    --timeout) timeout_s=${2:?--timeout needs a number of seconds}; shift ;;
    *) die "usage: $0 [--build] [--timeout SECONDS]" ;;
  esac
  shift
done

if [ $build = yes ] || ! docker image inspect "$CAIRN_IMAGE" >/dev/null 2>&1; then
  "$COMPOSE_DIR/build-image.sh"
fi
"$COMPOSE_DIR/certs.sh"
log "starting nodes 1..6"
compose up -d --no-build node-1 node-2 node-3 node-4 node-5 node-6
log "waiting up to ${timeout_s}s for a leader and six nodes up"
if ! wait_nodes_up "$timeout_s" 1 2 3 4 5 6; then
  log "node logs (last 20 lines each):"
  compose logs --tail 20 >&2 || true
  exit 1
fi
log "cluster is up: CLI with deploy/compose/cairn.sh (e.g. cairn.sh cluster status)"
