#!/usr/bin/env bash
# The one GPU call that says why DDP (1.23x, goal <= 1.1x) and context parallelism (0.622x, goal 0.60x) fall
# short on 2 GPUs: `fluxkiln bench --gpus 2 --profile` on nvidia-h200-x2 (see docs/gpus-many.md, "Profiling a
# multi-GPU run"), then the DDP part again with the old thread default, as an A/B of OMP_NUM_THREADS.
#   bash bench/run_on_gpu.sh bash bench/gpu_next.sh        (carry .whl; results in $OUT)
# Writes, each part as soon as it ends (a call cut short keeps what it measured):
#   $OUT/h200-<date>-gpus-2-profile.json   ddp + context_parallel, timed and profiled (copy it to bench/, then
#                                          run python bench/perf_docs.py: every bench/*-gpus-*.json is a row)
#   $OUT/h200-<date>-ddp-threads-ab.json   ddp again (4 steps), every worker with OMP_NUM_THREADS=$(nproc) (the
#                                          launcher's old default left torch's pool on every core); not a table row
#   $OUT/machine.txt, $OUT/*.log           CPUs, GPUs, clocks and power before/after, the full output
# Limits: T_MAIN=330 T_AB=150 seconds (90 cut the A/B short on 2026-11-28); with the install (~1 min) about
# 540 s. The -graphs variants (CUDA graphs, collectives captured) test whether a split image is launch-bound.
# A dry run of this script on a CPU machine: EXTRA=--tiny VARIANTS=one-eager,allgather-eager bash bench/gpu_next.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-next}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export FLUXKILN_CACHE=/tmp/fk-gpu-next
rm -rf "$FLUXKILN_CACHE"
T_MAIN=${T_MAIN:-330} T_AB=${T_AB:-150}
DATE=$(date +%Y-%m-%d)
MAIN="$OUT/h200-$DATE-gpus-2-profile.json"
AB="$OUT/h200-$DATE-ddp-threads-ab.json"
VARIANTS=${VARIANTS:-one-eager,one-compiled,ulysses-compiled,allgather-eager,allgather-compiled,one-graphs,allgather-graphs}
read -r -a extra <<<"${EXTRA:-}"
smi() { nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
  --format=csv 2>&1; }
{
  echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
  python3 -c "import os, torch; print('affinity', len(os.sched_getaffinity(0)), 'torch threads', \
torch.get_num_threads(), torch.__version__)"
  python3 -c "import pynvml" 2>/dev/null && echo "pynvml: yes" || echo "pynvml: no (SM clocks via nvidia-smi)"
  nvidia-smi topo -m 2>&1 | head -6
  echo "before:"; smi
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
quiet() { grep -v -e '^\[transformers\]' -e '^USDT:' -e 'FutureWarning' -e '^  warnings.warn' -e ' NCCL INFO '; }
# NCCL names its transport per channel ("via P2P/CUMEM", "via SHM", "via NET/Socket"): kept in machine.txt
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT timeout "$T_MAIN" fluxkiln bench "${extra[@]}" --gpus 2 --parts ddp,context_parallel \
  --profile --cp-variants "$VARIANTS" --out "$MAIN" 2>&1 | tee "$OUT/main.log" | quiet | tail -40
{
  echo "NCCL:"
  grep -E 'NCCL version|via (P2P|SHM|NET|COLLNET)|Using network|NCCL_P2P|NCCL_SHM' "$OUT/main.log" \
    | sed -E 's/.*NCCL INFO //; s/Channel [0-9]+\/[0-9]+ : //' | sort | uniq -c | head -30
  echo "after the main run:"; smi
} >>"$OUT/machine.txt"
OMP_NUM_THREADS=$(nproc) timeout "$T_AB" fluxkiln bench "${extra[@]}" --gpus 2 --parts ddp --train-steps 4 --profile \
  --out "$AB" 2>&1 | tee "$OUT/threads-ab.log" | quiet | tail -12
echo "after the A/B run:" >>"$OUT/machine.txt"; smi >>"$OUT/machine.txt"
ls -la "$OUT"
