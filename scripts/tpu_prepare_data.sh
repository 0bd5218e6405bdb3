#!/usr/bin/env bash
# Prepares a tfds dataset once into a shared data dir, from worker 0.
#
#   scripts/tpu_prepare_data.sh --name my-tpu --zone us-central2-b --data_dir gs://BUCKET/tfds [-- cifar100]
#
# Downloads and prepares the dataset (default cifar100) with tensorflow-datasets' own
# `tfds build`; training with --data_dir then reads it on every worker. Settings:
# scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE DATA_DIR
dataset=${EXTRA_ARGS[0]:-cifar100}
on_workers 0 "cd $(quoted "$REMOTE_DIR") && .venv/bin/tfds build $(quoted "$dataset") --data_dir=$(quoted "$DATA_DIR")"
