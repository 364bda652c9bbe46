#!/usr/bin/env bash
# The recipe's bowtie LoRA probed on a base, several settings at once, spread over the GPUs (docs/mini-flux.md,
# "A base with more pointed shapes").  On nvidia-h200-x2, carrying .whl and WEIGHTS:
#   WEIGHTS=stage/ bash bench/recipe_probes.sh '--seed 0' '--seed 1' '--preserve 2 --seed 0' ...
# WEIGHTS: a folder holding mini-flux/ (default: the shipped weights).  Each argument is one probe: the recipe's
# settings (recipes/train-lora-tiny.toml as bench/concept_probe.py flags) followed by the argument, whose flags
# override them (no double quotes, $ or backquotes: each lane's command runs through bash -c).  SCALES (e.g.
# 1.25) also samples at those LoRA scales; PROBE (64): prompts per reading; DEVICE (cuda); LIMIT (540): seconds
# before the lanes are stopped, counted from the install.  $OUT receives probes.tgz (every probe's JSON) and
# LANES.log; the table (CPU units, training captions, new prompts, leakage, shape cost at each scale) is printed last.
# NO_INSTALL=1 skips the install (a dry run on a CPU: NO_INSTALL=1 GPUS=1 DEVICE=cpu PROBE=2
#   bash bench/recipe_probes.sh '--steps 2 --vocab 4').
set -uo pipefail
OUT=${OUT:-/tmp/recipe-probes}; mkdir -p "$OUT"
WEIGHTS=${WEIGHTS:-plugins/miniflux/weights}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS" -gt 0 ] || { echo "no GPU found: set GPUS (and DEVICE=cpu for a dry run)" >&2; exit 2; }
[ $# -gt 0 ] || { echo "name one or more probes, e.g. '--seed 0' '--preserve 2 --seed 0'" >&2; exit 2; }
for extra in "$@"; do
  case $extra in
    *[\"\$\`]*) echo "probe '$extra': no double quotes, \$ or backquotes (it runs through bash -c)" >&2; exit 2;;
  esac
done
[ -f "$WEIGHTS/mini-flux/model_index.json" ] ||
  { echo "WEIGHTS=$WEIGHTS: no mini-flux/model_index.json there" >&2; exit 2; }
RECIPE="--weights $WEIGHTS --data recipes/data/bowties --shape bowtie --times shift --batch 8 --steps 240"
RECIPE+=" --object-weight 3 --layers '^(?!.*norm)' --lr 1.5e-3 --preserve 1 --preserve-every 4 --vocab 64"
RECIPE+="${SCALES:+ --lora-scales $SCALES}"
SWEEP="python bench/concept_sweep.py --out \$OUT --device ${DEVICE:-cuda} --probe ${PROBE:-64}"
lanes=() i=0
for extra in "$@"; do
  lanes+=("$(( i % GPUS ))|p$i|$SWEEP \"$RECIPE $extra\"")
  i=$(( i + 1 ))
done
rm -rf /tmp/lanes-out   # a warm machine keeps the last call's lanes: their rows would be printed again
OUT=/tmp/lanes-out LIMIT=${LIMIT:-540} bash bench/gpu_lanes.sh "${lanes[@]}" >/dev/null
tar -czf "$OUT/probes.tgz" -C /tmp/lanes-out . && cp /tmp/lanes-out/LANES.log "$OUT/"
grep -h "| --weights" /tmp/lanes-out/LANES.log | sed -E 's/--weights.*--vocab 64( --lora-scales [0-9.,]+)?//'
