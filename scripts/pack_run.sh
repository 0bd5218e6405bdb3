#!/usr/bin/env bash
# Stopped runs as one archive, to continue them on another machine (a VM that will be
# deleted, a lent GPU that goes back, a session whose disk does not outlive it): each
# run's records (config.json, TensorBoard events, evaluation results, logs) and its newest
# complete checkpoint, without the older ones it keeps (the latest three and the best) or
# the steps a resume set aside as corrupt.
#
#   bash scripts/pack_run.sh ARCHIVE.tgz WORKDIR [WORKDIR ...]   # here
#   tar -xzf ARCHIVE.tgz                                         # there, from the same folder
#
# The archive holds the workdirs' paths as given, so extracting it where they were given
# from puts them back (absolute paths: `tar -xzf ARCHIVE.tgz -C /`); the run's own command
# then resumes from that checkpoint, on any number of devices. A workdir that a run holds
# (RUNNING.json) is refused: stop the run first (SIGTERM makes it save a checkpoint and
# give the workdir back).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: bash scripts/pack_run.sh ARCHIVE.tgz WORKDIR [WORKDIR ...]" >&2
  exit 2
fi
archive="$1"
shift
absolute=0
for workdir in "$@"; do
  if [[ "$workdir" == /* ]]; then
    absolute=$((absolute + 1))
  fi
done
if ((absolute != 0 && absolute != $#)); then
  echo "error: give the workdirs all relative or all absolute: the archive is extracted" \
    "from one folder." >&2
  exit 2
fi
members=()
for workdir in "$@"; do
  workdir="${workdir%/}"
  if [[ ! -d "$workdir/checkpoints" ]]; then
    echo "error: $workdir has no checkpoints folder: not a training run's workdir." >&2
    exit 2
  fi
  if [[ -e "$workdir/RUNNING.json" ]]; then
    echo "error: a run holds $workdir ($workdir/RUNNING.json): stop it with SIGTERM, which" \
      "saves a checkpoint, then pack it (delete the file first if that run is gone)." >&2
    exit 2
  fi
  # A complete step is a folder named by its number; Orbax writes into a temporary name
  # and renames it when done.
  newest=$(find "$workdir/checkpoints" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' \
    -printf '%f\n' | sort -n | tail -n 1)
  if [[ -z "$newest" ]]; then
    echo "error: $workdir has no complete checkpoint to continue from." >&2
    exit 2
  fi
  while IFS= read -r -d '' path; do
    members+=("$path")
  done < <(find "$workdir" \( -path "$workdir/checkpoints" \
    -o -path "$workdir/corrupt_checkpoints" \) -prune -o -type f -print0)
  members+=("$workdir/checkpoints/$newest")
  echo "$workdir: step $newest"
done
mkdir -p "$(dirname "$archive")"
if ((absolute)); then
  # Stored without the leading /, as tar would, and extracted from / (`-C /`).
  tar -czf "$archive.partial" -C / -- "${members[@]#/}"
  extract="tar -xzf $archive -C /"
else
  tar -czf "$archive.partial" -- "${members[@]}"
  extract="tar -xzf $archive"
fi
mv "$archive.partial" "$archive"
echo "wrote $archive ($(du -h "$archive" | cut -f1)); continue with: $extract"
