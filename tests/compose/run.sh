#!/usr/bin/env bash
# End-to-end drill on the docker compose deployment (deploy/compose/):
# real cairn-node binaries in containers, three regions on separate networks.
#
#   1. build the image, start six nodes, wait for a leader and six nodes up
#   2. cairn init; back up a deterministic data tree (~18 MB: chat logs,
#      gift records, incompressible media, an empty file and directory, a
#      symlink, odd modes)
#   3. take region r2 away (a partition by default; CAIRN_DRILL_MODE=stop
#      stops its containers instead)
#   4. with r2 away: restore `latest` and compare byte for byte (diff -r,
#      sha256 of every file, types, modes, sizes, symlink targets, file
#      mtimes); back up a second dataset (writes go on); run
#      `cairn drill --without-region r2 --json` and check its exit code and
#      report
#   5. bring r2 back, wait until all six nodes are up, restore the dataset
#      written during the outage and compare it, then
#      `cairn check --read-data --repair --json` (which rebalances the packs
#      the outage left misplaced, then checks again) must say "ok": true
# Exits non-zero on the first failure with the step that failed; always
# removes the deployment (CAIRN_KEEP=1 leaves it running for a look). Every
# wait and every CLI call is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMPOSE=deploy/compose
# shellcheck source-path=SCRIPTDIR source=../../deploy/compose/lib.sh
source "$COMPOSE/lib.sh"

MODE=${CAIRN_DRILL_MODE:-partition}
case $MODE in partition | stop) ;; *) die "CAIRN_DRILL_MODE must be partition or stop, not '$MODE'" ;; esac
CLI_TIMEOUT_S=${CAIRN_CLI_TIMEOUT:-120}
export CAIRN_PASSWORD='compose drill passphrase, not a secret'
export CAIRN_TENANT=default

command -v python3 >/dev/null || die "python3 is needed (data generator, JSON checks)"
if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")" ]; then
  die "a compose deployment named '$COMPOSE_PROJECT_NAME' already exists; remove it with $COMPOSE/down.sh first"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cairn-compose-drill.XXXXXX")
export CAIRN_WORK=$WORK
STEP="setup"
started=$SECONDS

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "FAILED at step: $STEP (exit $rc$([ $rc -eq 124 ] && echo ": a command ran past its time limit"))"
    if docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" | grep -q .; then
      log "node logs (last 30 lines each):"
      compose logs --no-color --tail 30 >&2 2>&1 || true
    fi
  fi
  if [ -n "${CAIRN_KEEP:-}" ]; then
    log "CAIRN_KEEP is set: deployment left running, work dir $WORK"
  else
    "$COMPOSE/down.sh" || true
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { STEP=$*; log "== $*"; }
# The CLI in a client container, bounded; stdout is the command's.
cli() { timeout "$CLI_TIMEOUT_S" "$COMPOSE/cairn.sh" "$@"; }
fail() { log "FAILED: $*"; exit 1; }

# A listing that captures what a restore must reproduce: type, mode, size
# and content hash of files, symlink targets, file mtimes.
manifest() {
  (
    cd "$1"
    find . -mindepth 1 -printf '%y %m %P' \( -type l -printf ' -> %l' -o -true \) \
      \( -type f -printf ' %s bytes mtime %T@' -o -true \) -printf '\n' | LC_ALL=C sort
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
  )
}

must_restore_identical() { # SOURCE RESTORED
  diff -r --no-dereference "$1" "$2" >&2 || fail "restored tree $2 differs from $1 (diff -r above)"
  diff <(manifest "$1") <(manifest "$2") >&2 || fail "restored tree $2: types, modes, sizes, mtimes or checksums differ from $1 (above)"
  log "restored tree is identical to the source ($(find "$2" -type f | wc -l) files, $(du -sb "$2" | cut -f1) bytes)"
}

# Deterministic data: the same bytes on every run and every machine.
generate() { # DIR SEED SCALE
  python3 - "$@" <<'PY'
import json, os, random, sys
root, seed, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
words = ("gift tip wave hello stream rose rocket lol gg nice song dance "
         "follow share room host guest vip moderator emoji").split()
def put(path, data, mode=0o644, mtime=None):
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)
    os.chmod(full, mode)
    t = mtime if mtime is not None else 1763700000 + rng.randrange(86400 * 30)
    os.utime(full, (t, t))
base = 1763683200_000
for room in range(1, 4 * scale + 1):
    for day in range(3):
        lines = []
        ts = base + day * 86_400_000
        for _ in range(600):
            ts += rng.randrange(1, 4000)
            lines.append(json.dumps({"ts": ts, "room": room, "user": rng.randrange(1, 5000),
                                     "text": " ".join(rng.choice(words) for _ in range(rng.randrange(3, 16)))}))
        put(f"chat/room={room:06d}/2026-11-{21 + day}.jsonl", ("\n".join(lines) + "\n").encode())
rows = ["ts,from_user,to_host,gift,coins"]
for _ in range(8000 * scale):
    rows.append(f"{base + rng.randrange(10**9)},{rng.randrange(1, 5000)},{rng.randrange(1, 300)},{rng.choice(words)},{rng.choice((1, 5, 10, 99, 520, 1314))}")
put("gifts/gift-records.csv", ("\n".join(rows) + "\n").encode(), mode=0o600)
for i in range(scale):
    put(f"media/clip-{i}.bin", rng.randbytes(4 << 20))
put("media/README", b"opaque media, incompressible\n", mode=0o444)
put("profiles/empty.json", b"")
put("bin/export.sh", b"#!/bin/sh\necho export\n", mode=0o755)
os.makedirs(os.path.join(root, "empty-dir"), exist_ok=True)
os.symlink("chat/room=000001/2026-11-21.jsonl", os.path.join(root, "latest-room-1"))
PY
}

step "build the image"
build_started=$SECONDS
"$COMPOSE/build-image.sh"
build_s=$((SECONDS - build_started))
run_started=$SECONDS

step "start the deployment"
"$COMPOSE/down.sh" >/dev/null 2>&1 || true # stale networks or volumes of an earlier run
# up.sh makes the cluster CA, node certificates and bootstrap token
# (certs.sh); every CLI run then gets CAIRN_CA (the CA in the client
# container) and CAIRN_TOKEN (the bootstrap cluster-admin token, from lib.sh).
"$COMPOSE/up.sh" --timeout 120

step "generate data"
generate "$WORK/data" 1 3
generate "$WORK/outage" 2 1
log "source tree: $(find "$WORK/data" -type f | wc -l) files, $(du -sb "$WORK/data" | cut -f1) bytes"

step "cairn init"
cli init

step "cairn backup (all regions up)"
cli backup /files/data --dataset chat-messages --tag compose-drill --json >"$WORK/backup.json"
snapshot=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot_id"])' "$WORK/backup.json") ||
  fail "backup --json has no snapshot_id: $(cat "$WORK/backup.json")"
log "snapshot $snapshot: $(tr -d '\n ' <"$WORK/backup.json")"

step "take region r2 away ($MODE)"
"$COMPOSE/region-down.sh" "--$MODE" r2

step "restore latest with r2 away"
cli restore latest --dataset chat-messages --target /files/restore
must_restore_identical "$WORK/data" "$WORK/restore/data"

step "backup with r2 away (writes go on)"
cli backup /files/outage --dataset gift-records --json >"$WORK/backup-outage.json"
log "outage snapshot: $(tr -d '\n ' <"$WORK/backup-outage.json")"

step "cairn drill --without-region r2"
drill_rc=0
cli drill --without-region r2 --json >"$WORK/drill.json" || drill_rc=$?
log "drill report:"
cat "$WORK/drill.json" >&2
[ $drill_rc -eq 0 ] || fail "cairn drill exited with $drill_rc"
python3 - "$WORK/drill.json" <<'PY' || fail "drill report is not a clean pass (above)"
import json, sys
report = json.load(open(sys.argv[1]))
datasets = {s["dataset"] for s in report["snapshots_checked"]}
ok = (report["without_region"] == "r2" and not report["failures"]
      and datasets == {"chat-messages", "gift-records"} and report["bytes"] > 0)
sys.exit(0 if ok else 1)
PY

step "bring region r2 back"
"$COMPOSE/region-up.sh" --timeout 120 r2
wait_nodes_up 120 1 2 3 4 5 6 || fail "not every node is up after r2 came back"

step "restore the snapshot written during the outage"
cli restore latest --dataset gift-records --target /files/restore-outage
must_restore_identical "$WORK/outage" "$WORK/restore-outage/outage"

# Packs written during the outage hold more than m shards in r1 and r3: a
# plain check names them "misplaced". --repair rebalances them now (rather
# than at the next repair interval) and reports the check that follows.
step "cairn check --read-data --repair"
check_rc=0
cli check --read-data --repair --json >"$WORK/check.json" || check_rc=$?
log "check report: $(tr -d '\n ' <"$WORK/check.json")"
[ $check_rc -eq 0 ] || fail "cairn check exited with $check_rc"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if r["ok"] is True and r["shards_checked"] > 0 else 1)' "$WORK/check.json" ||
  fail "cairn check did not report \"ok\": true with shards read"

STEP="done"
log "compose drill passed ($MODE of r2): image build ${build_s}s, cluster drill $((SECONDS - run_started))s, total $((SECONDS - started))s"
