#!/usr/bin/env bash
# Creates the Secrets the StatefulSets mount, in namespace $1 (default cairn):
# - cairn-node-tls: ca.pem and node-N.pem / node-N.key for the six nodes of
#   configmap.yaml (ids 10 11 20 21 30 31), valid for the pods' DNS names;
# - cairn-bootstrap-token: a random `cairn_<64 hex>` token that becomes the
#   first cluster-admin token when the cluster initializes. Keep it: the CLI
#   takes it as CAIRN_TOKEN (and the CA as CAIRN_CA).
# The CA is made here with `cairn-node ca init` into $CAIRN_CA_DIR (default
# ./cairn-ca); keep ca.key offline, it signs every future node certificate.
#   deploy/k8s/make-secrets.sh [NAMESPACE]
set -euo pipefail
ns=${1:-cairn}
ca_dir=${CAIRN_CA_DIR:-./cairn-ca}
node_bin=${CAIRN_NODE_BIN:-cairn-node}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[ -f "$ca_dir/ca.pem" ] || "$node_bin" ca init --out "$ca_dir"
for region in 1 2 3; do
  for ordinal in 0 1; do
    id="$region$ordinal" pod="cairn-r$region-$ordinal"
    "$node_bin" ca issue --ca "$ca_dir" --node-id "$id" --region "r$region" \
      --host "$pod.cairn,$pod.cairn.$ns.svc,$pod.cairn.$ns.svc.cluster.local" --out "$work"
  done
done
cp "$ca_dir/ca.pem" "$work/ca.pem"
kubectl -n "$ns" create secret generic cairn-node-tls --from-file="$work"
printf 'cairn_%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$work/token"
kubectl -n "$ns" create secret generic cairn-bootstrap-token --from-file=bootstrap-token="$work/token"
echo "bootstrap token (keep it; the CLI reads it as CAIRN_TOKEN): $(cat "$work/token")"
