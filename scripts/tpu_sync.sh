#!/usr/bin/env bash
# Copies this checkout (without .git, .venv and runs/) to every worker, replacing the old copy.
#
#   scripts/tpu_sync.sh --name my-tpu --zone us-central2-b
#
# The installed package is an editable install of that copy, so a sync is enough to run
# changed code. Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
archive=${TMPDIR:-/tmp}/resnet_jax_sync.tar.gz
run tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
  --exclude=.pytest_cache -C "$(cd "$(dirname "$0")/.." && pwd)" .
tpu_vm scp "$archive" "$TPU_NAME:resnet_jax_sync.tar.gz" --worker=all
# Unpacked over the old copy: its .venv stays, files deleted here are not deleted there.
on_workers all "mkdir -p $(quoted "$REMOTE_DIR") && tar -xzf resnet_jax_sync.tar.gz -C $(quoted "$REMOTE_DIR") && rm resnet_jax_sync.tar.gz"
