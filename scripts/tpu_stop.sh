#!/usr/bin/env bash
# Stops the run on every worker as a preemption would, and clears a stale TPU lock.
#
#   scripts/tpu_stop.sh --name my-tpu --zone us-central2-b
#
# Sends SIGTERM (the run saves a checkpoint at the end of its step and exits 143), waits
# up to 5 minutes, kills what is left, then removes /tmp/libtpu_lockfile, which a killed
# process leaves behind and which keeps the next run off the TPU. Settings:
# scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
on_workers all "pkill -TERM -f resnet_jax.main || true; for _ in \$(seq 60); do pgrep -f resnet_jax.main > /dev/null || break; sleep 5; done; pkill -KILL -f resnet_jax.main || true; sudo rm -f /tmp/libtpu_lockfile"
