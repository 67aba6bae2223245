#!/usr/bin/env bash
# Run rat_jax on every worker of a Cloud TPU VM pod slice (the same command on all of them).
# Run it from your workstation, where `gcloud` is logged in.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh [--setup] \
#       -- --config=configs/officehome.py --workdir=/mnt/shared/runs/officehome [--config.x=y ...]
#
# OfficeHome on a pod slice (data and weights at the same path on every worker, workdir on a
# filesystem that all workers share, e.g. a Filestore NFS or gcsfuse mount):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --setup -- \
#       --config=configs/officehome.py --workdir=/mnt/shared/runs/officehome \
#       --config.data_root=/mnt/shared/domainbed \
#       --config.foundation=/mnt/shared/weights/resnet50-0676ba61.pth
#
# --setup first copies this checkout to ~/rat_jax on every worker and installs it with the TPU
# extra (`pip install -e ".[tpu]"`); later runs can omit it. Every worker then runs
# `python -m rat_jax.main ARGS`; rat_jax.distributed.initialize() finds the other workers itself
# (jax.distributed.initialize() with no arguments reads the slice's metadata). Output of every worker
# comes back through ssh; only process 0 writes the report. Environment: TPU_NAME, ZONE (required),
# PROJECT (optional), REMOTE_DIR (default rat_jax, relative to the remote home), PYTHON (default
# python3), EXTRA_ENV (e.g. "RAT_JAX_HEARTBEAT_TIMEOUT=120").
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REMOTE_DIR="${REMOTE_DIR:-rat_jax}"
PYTHON="${PYTHON:-python3}"
EXTRA_ENV="${EXTRA_ENV:-}"
SETUP=0
if [[ "${1:-}" == "--setup" ]]; then SETUP=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then sed -n '2,21p' "$0"; exit 2; fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project "$PROJECT")
REPO="$(cd "$(dirname "$0")/.." && pwd)"

if [[ $SETUP -eq 1 ]]; then
  tarball="$(mktemp -t rat_jax.XXXXXX.tar.gz)"
  tar -C "$REPO" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$tarball" .
  "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:rat_jax.tar.gz" --worker=all "${where[@]}"
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="set -e; \
    mkdir -p $REMOTE_DIR && tar -xzf rat_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
    $PYTHON -m pip install -q -e '.[tpu]'"
  rm -f "$tarball"
fi

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
"${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" \
  --command="cd $REMOTE_DIR && env $EXTRA_ENV $PYTHON -m rat_jax.main$args"
