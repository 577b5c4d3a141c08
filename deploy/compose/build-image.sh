#!/usr/bin/env bash
# Builds the `cairn:local` image (override with CAIRN_IMAGE) from the release
# binaries of this checkout, without pulling anything: the image is FROM
# scratch and holds the binaries plus the shared libraries `ldd` lists for
# them, copied from this machine at the same paths.
#   deploy/compose/build-image.sh            # cargo build --release, then docker build
#   CAIRN_SKIP_CARGO=1 deploy/compose/build-image.sh   # use target/release as it is
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

BINARIES=(cairn-node cairn)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
if [ -z "${CAIRN_SKIP_CARGO:-}" ]; then
  log "cargo build --release --bin cairn-node --bin cairn"
  (cd "$REPO_ROOT" && cargo build --release --bin cairn-node --bin cairn)
fi

context=$(mktemp -d "${TMPDIR:-/tmp}/cairn-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/etc" "$context/rootfs/tmp" "$context/bin" "$context/data"
chmod 1777 "$context/rootfs/tmp"
chmod 0755 "$context/data"
# Explicit lookup order: the container's /etc/hosts, then the engine's DNS.
printf 'hosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"

for bin in "${BINARIES[@]}"; do
  src=$TARGET_DIR/release/$bin
  [ -x "$src" ] || die "$src is missing: build it with cargo build --release --bin $bin"
  cp "$src" "$context/bin/$bin"
  # Every library the binary needs, the dynamic loader included, at the path
  # the loader will look for it. `cp -L` copies the file a symlink names:
  # the image has no other copy for the link to point to.
  if ! deps=$(ldd "$src"); then
    die "ldd failed on $src"
  fi
  while read -r lib; do
    [ -n "$lib" ] || continue
    case $lib in missing:*) die "$bin needs ${lib#missing:}, which ldd cannot find" ;; esac
    [ -e "$lib" ] || die "$bin needs $lib, which does not exist here"
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
  done < <(printf '%s\n' "$deps" | awk '
    /=> not found/ { print "missing:" $1; next }
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }')
done
log "image content:"
(cd "$context/rootfs" && find . -type f -printf '  /%P  %s bytes\n') >&2
(cd "$context/bin" && find . -type f -printf '  /usr/local/bin/%P  %s bytes\n') >&2

# The legacy builder needs nothing beyond the engine; BuildKit needs the
# buildx plugin, which is not always installed.
if ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
previous=$(docker image inspect -f '{{.Id}}' "$CAIRN_IMAGE" 2>/dev/null || true)
log "docker build -t $CAIRN_IMAGE"
docker build -q -t "$CAIRN_IMAGE" -f "$COMPOSE_DIR/Dockerfile" "$context" >/dev/null
# The image this one replaces would stay behind untagged (~180 MB a build).
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$CAIRN_IMAGE")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
log "built $CAIRN_IMAGE ($(docker image inspect -f '{{.Size}}' "$CAIRN_IMAGE") bytes)"
