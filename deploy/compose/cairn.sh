#!/usr/bin/env bash
# Runs the `cairn` CLI against the compose deployment, from a one-off client
# container on the WAN network:
#   CAIRN_PASSWORD=... deploy/compose/cairn.sh init
#   deploy/compose/cairn.sh cluster status --json
# CAIRN_WORK=DIR mounts that host directory at /files (the container's working
# directory) to back up from it or restore into it:
#   CAIRN_WORK=$PWD deploy/compose/cairn.sh backup data --dataset chat-messages
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cairn_cli "$@"
