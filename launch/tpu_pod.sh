#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (TPU VM): copy the repository to every worker, install it, and
# run the same fourm-train command on all workers at once. JAX finds the coordinator and the
# process ids from the TPU metadata, so no distributed variables are needed.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh --config configs/pretrain.py:base \
#       --workdir gs://my-bucket/runs/base
#
# Check the slice fits first (on any machine, no TPU needed):
#   fourm-aot --config configs/pretrain.py:base --topology v5p-128
# Optional: PROJECT, SETUP=0 (skip copy + install), REMOTE_DIR (default ~/fourm).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-fourm}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${SETUP:-1}" == 1 ]]; then
  tarball=$(mktemp --suffix=.tar.gz)
  git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:fourm.tar.gz" --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}"
  "${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command \
    "mkdir -p $REMOTE_DIR && tar -xzf fourm.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
fi

# Quote the trainer flags for the remote shell.
args=$(printf ' %q' "$@")
"${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command \
  "cd $REMOTE_DIR && python3 -m fourm.cli.train $args 2>&1 | tee -a train_\$(hostname).log"
