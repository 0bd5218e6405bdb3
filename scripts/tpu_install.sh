#!/usr/bin/env bash
# Installs the synced checkout on every worker: a venv with jax's TPU build and the project.
#
#   scripts/tpu_install.sh --name my-tpu --zone us-central2-b
#
# Idempotent: rerunning keeps the venv and only installs what changed. Run
# scripts/tpu_sync.sh first. Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
# Ubuntu images may lack python3-venv: installed the first time only.
make_venv="python3 -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv .venv; }"
on_workers all "cd $(quoted "$REMOTE_DIR") && { test -x .venv/bin/python || $make_venv; } && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -U 'jax[tpu]' -e . && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
