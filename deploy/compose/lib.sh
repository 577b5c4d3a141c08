# shellcheck shell=bash
# Shared helpers of the deploy/compose scripts; sourced, never run.
#
# Names are fixed so that the networks read as the regions they stand for:
# compose project `cairn`, containers `cairn-node-N`, networks `cairn-r1`,
# `cairn-r2`, `cairn-r3` and `cairn-wan`. One such deployment per Docker
# engine at a time.

COMPOSE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT=$(cd "$COMPOSE_DIR/../.." && pwd)
export COMPOSE_PROJECT_NAME=cairn
export CAIRN_IMAGE=${CAIRN_IMAGE:-cairn:local}
# Every node and the region it is in (the same map as docker-compose.yml).
NODE_REGIONS=(1:r1 2:r1 3:r2 4:r2 5:r3 6:r3)
REGIONS=(r1 r2 r3)
# Clients reach every region over the WAN; one node per region is enough,
# the CLI fails over between them.
export CAIRN_CLUSTER=${CAIRN_CLUSTER:-node-1:7100,node-3:7100,node-5:7100,node-2:7100,node-4:7100,node-6:7100}

# The bootstrap cluster-admin token, made by certs.sh; the CLI reads CAIRN_TOKEN.
SECRETS_DIR="$COMPOSE_DIR/.secrets"
if [ -z "${CAIRN_TOKEN:-}" ] && [ -r "$SECRETS_DIR/bootstrap-token" ]; then
  CAIRN_TOKEN=$(cat "$SECRETS_DIR/bootstrap-token")
  export CAIRN_TOKEN
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# `docker compose` (v2 plugin) when present, else the standalone
# `docker-compose` (v1): both read the same file.
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -f "$COMPOSE_DIR/docker-compose.yml" "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f "$COMPOSE_DIR/docker-compose.yml" "$@"
  else
    die "neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

# Nodes (ids) of one region, e.g. `region_nodes r2` -> "3 4".
region_nodes() {
  local region=$1 entry out=()
  for entry in "${NODE_REGIONS[@]}"; do
    [ "${entry#*:}" = "$region" ] && out+=("${entry%%:*}")
  done
  [ ${#out[@]} -gt 0 ] || die "unknown region '$region' (expected one of: ${REGIONS[*]})"
  echo "${out[@]}"
}

# Runs the `cairn` CLI in a one-off client container on the WAN network.
# CAIRN_PASSWORD and CAIRN_TENANT pass through from the caller's
# environment. With CAIRN_WORK set, that host directory is mounted at /files
# (the client runs as the caller's uid so files it writes there stay the
# caller's).
cairn_cli() {
  local args=(run --rm -T --no-deps -u "$(id -u):$(id -g)")
  if [ -n "${CAIRN_WORK:-}" ]; then
    args+=(-v "$CAIRN_WORK:/files")
  fi
  compose "${args[@]}" client "$@"
}

# Polls `cairn cluster status --json` until it shows a leader and every node
# in "$@" (ids) up, for at most $1 seconds. Prints the last status on failure.
wait_nodes_up() {
  local timeout_s=$1; shift
  local deadline=$((SECONDS + timeout_s)) status=""
  while [ $SECONDS -lt $deadline ]; do
    if status=$(timeout 60 "$COMPOSE_DIR/cairn.sh" cluster status --json 2>/dev/null) &&
      python3 -c '
import json, sys
status = json.loads(sys.argv[1])
want = {int(n) for n in sys.argv[2:]}
up = {n["node_id"] for n in status["nodes"] if n["up"]}
sys.exit(0 if status.get("leader") is not None and want <= up else 1)
' "$status" "$@"; then
      return 0
    fi
    sleep 2
  done
  log "cluster did not show a leader and nodes $* up within ${timeout_s}s; last status:"
  printf '%s\n' "${status:-<no answer>}" >&2
  return 1
}
