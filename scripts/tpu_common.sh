# shellcheck shell=bash
# Shared by the scripts/tpu_*.sh scripts (sourced, not run): settings and `run`.
#
# Every setting comes from a flag or, failing that, an environment variable:
#   --name NAME            TPU_NAME         the TPU VM (required)
#   --zone ZONE            TPU_ZONE         its zone (required), e.g. us-central2-b
#   --project PROJECT      TPU_PROJECT      default: gcloud's configured project
#   --type TYPE            TPU_TYPE         accelerator type, default v4-8; a pod slice
#                                           is just a larger one (v4-32, v5litepod-16, ...)
#   --version VERSION      TPU_VERSION      TPU VM software; default derived from --type
#   --workdir gs://...     WORKDIR          the run's workdir, which every worker must reach
#   --data_dir gs://...    DATA_DIR         tfds data dir (optional; default tfds's own)
#   --config FILE          CONFIG           default configs/resnet18.py
#   --worker N|all         WORKER           which workers (logs, tensorboard: default 0)
#   --remote_dir DIR       REMOTE_DIR       the checkout on the workers, default resnet_jax
#   --dry-run                               print the commands instead of running them
#   -- ARGS...                              more flags for resnet_jax.main (train, eval)
#
# `run` prints each command as one shell-quoted line on stdout under --dry-run, and
# otherwise echoes it to stderr and runs it.

set -euo pipefail

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_TYPE=${TPU_TYPE:-v4-8}
TPU_VERSION=${TPU_VERSION:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
CONFIG=${CONFIG:-configs/resnet18.py}
WORKER=${WORKER:-}
REMOTE_DIR=${REMOTE_DIR:-resnet_jax}
DRY_RUN=0
SPOT=0
EXTRA_ARGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  # The comment block at the top of the calling script, without its '# '.
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# shellcheck disable=SC2034  # SPOT is read by tpu_create.sh.
parse_flags() {
  while (($#)); do
    local flag=$1 value=""
    case "$flag" in
      --*=*) value=${flag#*=}; flag=${flag%%=*} ;;
    esac
    case "$flag" in
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); return ;;
      --name | --zone | --project | --type | --version | --workdir | --data_dir | --config | --worker | --remote_dir)
        if [[ -z $value ]]; then
          (($# >= 2)) || die "$flag needs a value"
          value=$2
          shift
        fi
        case "$flag" in
          --name) TPU_NAME=$value ;;
          --zone) TPU_ZONE=$value ;;
          --project) TPU_PROJECT=$value ;;
          --type) TPU_TYPE=$value ;;
          --version) TPU_VERSION=$value ;;
          --workdir) WORKDIR=$value ;;
          --data_dir) DATA_DIR=$value ;;
          --config) CONFIG=$value ;;
          --worker) WORKER=$value ;;
          --remote_dir) REMOTE_DIR=$value ;;
        esac
        ;;
      *) die "unknown flag $flag (see $0 --help)" ;;
    esac
    shift
  done
}

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name} ]] || die "$name is not set: pass its flag or export $name (see $0 --help)"
  done
}

require_gs_workdir() {
  require WORKDIR
  [[ $WORKDIR == gs://* ]] || die "WORKDIR=$WORKDIR: every worker writes to it, so it must be a gs:// bucket path"
}

# The TPU VM software image for an accelerator type (override with --version).
default_version() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# The arguments as one line that a shell (or Python's shlex.split) reads back as them.
quoted() {
  local words=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      words+=("$word")
    else
      words+=("${word@Q}")
    fi
  done
  echo "${words[*]}"
}

run() {
  if ((DRY_RUN)); then
    quoted "$@"
  else
    printf '+ %s\n' "$*" >&2
    "$@"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND [NAME] ARGS... with the zone and project. The
# VM's name follows the subcommand, except for scp, whose arguments name it (NAME:PATH).
tpu_vm() {
  local subcommand=$1
  shift
  local args=("$subcommand")
  [[ $subcommand == scp ]] || args+=("$TPU_NAME")
  args+=(--zone="$TPU_ZONE")
  [[ -z $TPU_PROJECT ]] || args+=(--project="$TPU_PROJECT")
  run gcloud compute tpus tpu-vm "${args[@]}" "$@"
}

# Runs a shell command line on the workers ($1: "all" or a worker index).
on_workers() {
  tpu_vm ssh --worker="$1" --command="$2"
}

# The resnet_jax.main command of a mode (train or eval), shell-quoted for a remote command line.
main_command() {
  local args=(.venv/bin/python -m resnet_jax.main --config "$CONFIG" --workdir "$WORKDIR" --distributed)
  [[ $1 == train ]] || args+=("--mode=$1")
  [[ -z $DATA_DIR ]] || args+=("--config.data_dir=$DATA_DIR")
  args+=("${EXTRA_ARGS[@]}")
  quoted "${args[@]}"
}
