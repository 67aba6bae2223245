#!/usr/bin/env bash
# N rat_jax processes on this machine, joined through a coordinator on 127.0.0.1 (CPU or GPUs).
#
#   launch/local.sh [-n PROCESSES] [-g GPUS_PER_PROCESS] [-c CPU_DEVICES_PER_PROCESS] [-p PORT] \
#       -- --config=configs/officehome.py --workdir=runs/officehome [--config.x=y ...]
#
# OfficeHome, two processes, each driving 4 of this machine's 8 GPUs:
#   launch/local.sh -n 2 -g 4 -- --config=configs/officehome.py --workdir=runs/officehome \
#       --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
# CPU only (a rehearsal of a multi-host run; 4 emulated devices per process):
#   launch/local.sh -n 2 -c 4 -- --config=configs/officehome.py:smoke --workdir=/tmp/oh_smoke
#
# Everything after "--" goes to `python -m rat_jax.main`. Process i gets RAT_JAX_COORDINATOR,
# RAT_JAX_NUM_PROCESSES and RAT_JAX_PROCESS_ID (read by rat_jax.distributed.initialize), and with -g
# its own CUDA_VISIBLE_DEVICES. Process 0 prints to this terminal, process i>0 to
# $LOG_DIR/process_i.log (default: <workdir>/logs). If one process fails, the others are stopped.
set -euo pipefail

NPROC=2; GPUS=""; CPU_DEVICES=""; PORT=""
PYTHON="${PYTHON:-python}"
MODULE="${MODULE:-rat_jax.main}"  # tests run their own module
while getopts "n:g:c:p:h" opt; do
  case "$opt" in
    n) NPROC="$OPTARG" ;;
    g) GPUS="$OPTARG" ;;
    c) CPU_DEVICES="$OPTARG" ;;
    p) PORT="$OPTARG" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then sed -n '2,16p' "$0"; exit 2; fi

if [[ -z "$PORT" ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
WORKDIR=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && WORKDIR="${arg#--workdir=}"; done
LOG_DIR="${LOG_DIR:-${WORKDIR:-.}/logs}"
mkdir -p "$LOG_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < NPROC; i++)); do
  env_vars=(RAT_JAX_COORDINATOR="127.0.0.1:$PORT" RAT_JAX_NUM_PROCESSES="$NPROC" RAT_JAX_PROCESS_ID="$i")
  if [[ -n "$GPUS" ]]; then
    first=$((i * GPUS))
    env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS - 1)))")
  fi
  [[ -n "$CPU_DEVICES" ]] && env_vars+=(RAT_JAX_CPU_DEVICES="$CPU_DEVICES")
  if [[ $i -eq 0 ]]; then
    env "${env_vars[@]}" "$PYTHON" -m "$MODULE" "$@" &
  else
    env "${env_vars[@]}" "$PYTHON" -m "$MODULE" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "local.sh: $NPROC processes, coordinator 127.0.0.1:$PORT, logs of processes 1.. in $LOG_DIR" >&2

status=0
for ((left = NPROC; left > 0; left--)); do
  if ! wait -n; then
    status=1
    echo "local.sh: a process failed; stopping the others (see $LOG_DIR)" >&2
    cleanup
  fi
done
exit $status
