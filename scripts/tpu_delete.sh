#!/usr/bin/env bash
# Deletes the TPU VM (the gs:// workdir and data stay).
#
#   scripts/tpu_delete.sh --name my-tpu --zone us-central2-b
#
# Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
tpu_vm delete --quiet
