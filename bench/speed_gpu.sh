#!/usr/bin/env bash
# One GPU call for the first-image / load / overhead / step-cache / CUDA-graphs questions, most important first;
# each part has its own time limit and writes its JSON as it goes, so a call cut short keeps what it measured.
#   bash bench/run_on_gpu.sh bash bench/speed_gpu.sh        (carry .whl and .whl-extra; results in $OUT)
# Parts (seconds are limits, not estimates):
#   1. e2e (with --e2e-warmup): random-weight FLUX.1-dev folder with full-size blocks (DEPTH=5,10 double/single blocks by default,
#      with full T5-XXL, CLIP and VAE, about 16 GB; DEPTH=full for all 19/38, 32 GB and ~60 s more), stock vs
#      `fluxkiln run` (go_fast) in fresh processes, compile cache cold then warm, stock and warm REPEATS=2 times
#      in turns (the load targets by medians; each more pair ~50 s)            -> $OUT/e2e.json
#   2. sampling: schnell/dev go_fast with whole-step CUDA graphs (the default) and without, schnell with CUDA graphs
#      per block, dev go_fast + step cache (compile cache from
#      part 1, so dev go_fast is warm), engine phases for schnell                -> $OUT/speed.json "sample"
#      then, in the same process (so each row has the random-weight Δ beside it), the quality guard on mini-flux
#      dev: eager, compiled, go_fast, go_fast + step cache 0.05 / 0.1             -> $OUT/speed.json "quality"
#   3. fp8_ckpt_24gb training (the 24 GB-card setup), in two processes (is it stable?), each with one more
#      short run under the profiler (GPU busy and idle per step)          -> $OUT/train-1.json, train-2.json
# Limits: T_E2E=330 T_SAMPLE=300 T_TRAIN=150 (each training process) seconds (the e2e part took 4.5-5 minutes
# on an H200).
# PARTS=e2e,sample,train (the default) picks parts; sample without e2e compiles dev go_fast cold.
set -uo pipefail
OUT=${OUT:-/tmp/speed-out}
mkdir -p "$OUT"
# The GPU machine's image sets PYTHONDONTWRITEBYTECODE=1 and ships torch without bytecode, so every process there
# compiled torch's sources again (8.5 s of a 13.4 s import, varying by seconds): compile them once first, as any
# normal install has them (PYC=0 keeps the image as it is).
if [ "${PYC:-1}" != 0 ]; then
  python3 -m compileall -q -j 16 "$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
    >/dev/null 2>&1 || true
fi
CACHE=/tmp/fk-speed-cache
T_E2E=${T_E2E:-330} T_SAMPLE=${T_SAMPLE:-300} T_TRAIN=${T_TRAIN:-150} DEPTH=${DEPTH:-5,10}
depth=(); [ "$DEPTH" != full ] && depth=(--e2e-depth "$DEPTH")
PARTS=,${PARTS:-e2e,sample,train},
part() { [[ $PARTS == *,$1,* ]]; }
part e2e && rm -rf "$CACHE" /tmp/fk-e2e-model
part e2e && timeout "$T_E2E" fluxkiln bench --e2e --e2e-go-fast --e2e-warmup --e2e-repeats "${REPEATS:-2}" --e2e-folder /tmp/fk-e2e-model --e2e-cache "$CACHE" \
  "${depth[@]}" --out "$OUT/e2e.json" 2>&1 | tail -25
part sample && FLUXKILN_CACHE="$CACHE" timeout "$T_SAMPLE" fluxkiln bench --only sample --no-stock --repeats 1 \
  --configs schnell-go_fast,schnell-go_fast-nograph,schnell-go_fast-graphs,dev-go_fast,dev-go_fast-nograph,dev-go_fast-cache \
  --cache-threshold 0.1 --quality --quality-prompts 64 --quality-variants dev --quality-thresholds 0.05,0.1 \
  --out "$OUT/speed.json" 2>&1 | grep -v '^\[transformers\]' | tail -45
for run in 1 2; do
  part train && timeout "$T_TRAIN" fluxkiln bench --only train --train-configs fp8_ckpt_24gb --train-profile --no-stock \
    --out "$OUT/train-$run.json" 2>&1 | grep '^\[bench\] train\|^error in' | cut -c1-400
done
ls -la "$OUT"
