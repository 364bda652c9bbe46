#!/usr/bin/env bash
# One GPU call: one more training stage of a mini-flux base that is taught more shapes, then the recipe's bowtie
# LoRA probed on the new base (docs/mini-flux.md, "A base with more pointed shapes").  On nvidia-h200-x2 (any
# number of GPUs: training on all, probes spread over them), carrying .whl and INIT's folder:
#   INIT=stage/mini-flux MORE=cross,diamond bash bench/base_stage.sh
# INIT: the pipeline folder to continue (default: the shipped weights); MORE: its more_shapes; BASE_SECONDS (190),
# DEADLINE (320): the stage's base budget and deadline; SEEDS (0 1 2 3): the probes' training seeds, each the
# recipe's settings, all at once after the training, spread over the GPUs.  $OUT receives train.log, metrics.json,
# mini-flux.tar and mini-flux-schnell.tar (the stage's weights, to continue from or ship), LANES.log and probes.tgz
# (every probe's JSON); the probes' table is printed last.  About 450 s with the install.  NO_INSTALL=1 skips the
# install; EXTRA adds arguments to the training (a dry run on a CPU: NO_INSTALL=1 GPUS=1 SEEDS= EXTRA="--preset micro").
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
B="--weights /tmp/mf-work --data recipes/data/bowties --shape bowtie --times shift --batch 8 --steps 240 --object-weight 3"
B+=" --layers '^(?!.*norm)' --lr 1.5e-3 --preserve 1 --preserve-every 4 --vocab 64 --lora-scales 1.25"
lanes=() i=0
for seed in ${SEEDS-0 1 2 3}; do
  lanes+=("$(( i % GPUS ))|s$seed|python bench/concept_sweep.py --out \$OUT --probe 64 \"$B --seed $seed\"")
  i=$(( i + 1 ))
done
[ ${#lanes[@]} -gt 0 ] || exit 0
OUT=/tmp/lanes-out LIMIT=$(( 585 - SECONDS )) bash bench/gpu_lanes.sh "${lanes[@]}" >/dev/null
tar -czf "$OUT/probes.tgz" -C /tmp/lanes-out . && cp /tmp/lanes-out/LANES.log "$OUT/"
grep -h "| --weights" /tmp/lanes-out/LANES.log | sed -E 's/--weights.*--lora-scales 1.25//'
