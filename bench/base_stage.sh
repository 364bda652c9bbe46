#!/usr/bin/env bash
# One GPU call: one more training stage of a mini-flux base that is taught more shapes, then the recipe's bowtie
# LoRA probed on the new base (docs/mini-flux.md, "A base with more pointed shapes").  On nvidia-h200-x2 (any
# number of GPUs: training on all, probes spread over them), carrying .whl and INIT's folder:
#   INIT=stage/mini-flux MORE=cross,diamond bash bench/base_stage.sh
# INIT: the pipeline folder to continue (default: the shipped weights); MORE: its more_shapes; BASE_SECONDS (190),
# DEADLINE (320): the stage's base budget and deadline; SEEDS (0 1 2 3): the probes' training seeds, each the
# recipe's settings (bench/recipe_probes.sh), all at once after the training, over the GPUs.  $OUT receives
# train.log, metrics.json, mini-flux.tar and mini-flux-schnell.tar (the stage's weights, to continue from or ship),
# LANES.log and probes.tgz (every probe's JSON); the probes' table is printed last.  About 450 s with the install.
# NO_INSTALL=1 skips the install; EXTRA adds arguments to the training (a dry run on a CPU: NO_INSTALL=1 GPUS=1
# SEEDS= EXTRA="--preset micro").
set -uo pipefail
OUT=${OUT:-/tmp/base-stage}; mkdir -p "$OUT"
INIT=${INIT:-plugins/miniflux/weights/mini-flux}; MORE=${MORE:-cross,diamond}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
if [ -z "${NO_INSTALL:-}" ]; then
  OUT=/tmp/lanes/install bash bench/gpu_suite.sh --install-only 2>&1 | tail -2 || exit 1
  export PYTHONPATH=/tmp/site:$PWD/bench PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 NO_INSTALL=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
torchrun --standalone --nproc-per-node "$GPUS" -m fluxkiln.plugins.miniflux.train --out /tmp/mf \
  --work /tmp/mf-work --set init="\"$INIT\"" --set more_shapes="\"$MORE\"" --set base_seconds="${BASE_SECONDS:-190}" \
  --set base_lr=5e-4 --set guide_seconds=50 --set schnell_seconds=12 --set pool_seconds=12 \
  --set deadline="${DEADLINE:-320}" ${EXTRA:-} >"$OUT/train.log" 2>&1
rc=$?; echo "trained in ${SECONDS}s, rc $rc"; grep -E "^(dev|schnell) |^\| " "$OUT/train.log" | tail -12
[ "$rc" = 0 ] || exit "$rc"
cp /tmp/mf/metrics.json "$OUT/"
for m in mini-flux mini-flux-schnell; do tar -cf "$OUT/$m.tar" -C /tmp/mf-work "$m"; done
probes=(); for seed in ${SEEDS-0 1 2 3}; do probes+=("--seed $seed"); done
[ ${#probes[@]} -gt 0 ] || exit 0
OUT=$OUT GPUS=$GPUS WEIGHTS=/tmp/mf-work SCALES=1.25 LIMIT=$(( 585 - SECONDS )) \
  bash bench/recipe_probes.sh "${probes[@]}"
