#!/usr/bin/env bash
# Makes what the TLS deployment needs, once (existing files are kept):
# - deploy/compose/.secrets/bootstrap-token: a random `cairn_<64 hex>` token
#   that becomes the first cluster-admin token when the cluster initializes
#   (the directory is 0700; the file is mounted read-only into the nodes);
# - in the cairn-certs volume, with the real `cairn-node ca` tooling: the
#   cluster CA (ca.pem, ca.key) and node-N.pem / node-N.key for nodes 1..6,
#   valid for the host name node-N.
#   deploy/compose/certs.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

mkdir -p "$SECRETS_DIR"
chmod 700 "$SECRETS_DIR"
if [ ! -s "$SECRETS_DIR/bootstrap-token" ]; then
  token="cairn_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  # Readable by the node's uid through the bind mount; the 0700 directory
  # keeps other host users out.
  (umask 022 && printf '%s' "$token" >"$SECRETS_DIR/bootstrap-token")
  log "made the bootstrap token in $SECRETS_DIR/bootstrap-token"
fi

# `ca init` and `ca issue` refuse to overwrite: an existing CA or
# certificate is kept.
run_ca() {
  local out
  if ! out=$(compose run --rm -T --no-deps certs "$@" 2>&1); then
    case $out in
      *"refusing to overwrite"*) ;;
      *) die "cairn-node ca $*: $out" ;;
    esac
  fi
}
run_ca init --out /data
for entry in "${NODE_REGIONS[@]}"; do
  id=${entry%%:*} region=${entry#*:}
  run_ca issue --ca /data --node-id "$id" --region "$region" --host "node-$id" --out /data
done
log "cluster CA and node certificates are in the cairn-certs volume"
