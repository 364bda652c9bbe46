#!/usr/bin/env bash
# Several jobs in one GPU call, each on its own GPUs (a "lane"), so one machine's time serves them all:
#   bash bench/gpu_lanes.sh 'GPUS|NAME|COMMAND' ...
# e.g. '0,1|train|torchrun ... --out $OUT'  '2|suite|bash bench/gpu_suite.sh'  '3|speed|bash bench/speed_gpu.sh'.
# Installs once (every .whl*/ folder present, then fluxkiln, into /tmp/site; NO_INSTALL=1 skips it), then starts
# every lane at once with CUDA_VISIBLE_DEVICES=GPUS, OUT=/tmp/lanes/NAME and NO_INSTALL=1, each stopped (SIGINT,
# then SIGKILL 20 s later) LIMIT seconds (default 540) after this script began.  Then every lane's folder comes
# back under the call's $OUT within its limits (8 files): files over 4 MB as they are (NAME-FILE), the rest as
# NAME.tgz; with LANES.log (every lane's output, prefixed) and a table of the lanes last.
set -uo pipefail
RESULT=${OUT:-/tmp/lanes-out}
LIMIT=${LIMIT:-540}
mkdir -p "$RESULT" /tmp/lanes
if [ -z "${NO_INSTALL:-}" ]; then
  OUT=/tmp/lanes/install bash bench/gpu_suite.sh --install-only 2>&1 | tail -8 || exit 1
  python3 -m compileall -q -j 32 /tmp/site >/dev/null 2>&1 || true
fi
export PYTHONPATH=/tmp/site:$PWD/bench PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 NO_INSTALL=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
echo "installed in ${SECONDS}s; lanes stop at ${LIMIT}s"
names=() pids=()
for lane in "$@"; do
  IFS='|' read -r gpus name cmd <<<"$lane"
  dir=/tmp/lanes/$name
  rm -rf "$dir"; mkdir -p "$dir"
  left=$(( LIMIT - SECONDS ))
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT=$dir CALL_LIMIT=$(( left + 60 ))
    start=$SECONDS
    timeout --signal=INT --kill-after=20 "$left" bash -c "$cmd" >"$dir/lane.log" 2>&1
    echo "$? $(( SECONDS - start ))" >"$dir/lane.rc" ) &
  names+=("$name") pids+=($!)
  echo "lane $name on GPU(s) $gpus: $cmd"
done
wait "${pids[@]}"
printf '\n| lane | GPUs | rc | seconds |\n|---|---|---|---|\n' >/tmp/lanes/table
for lane in "$@"; do
  IFS='|' read -r gpus name cmd <<<"$lane"
  dir=/tmp/lanes/$name
  sed "s/^/[$name] /" "$dir/lane.log" >>"$RESULT/LANES.log"
  read -r rc secs <"$dir/lane.rc"
  echo "| $name | $gpus | $rc | $secs |" >>/tmp/lanes/table
  find "$dir" -maxdepth 1 -type f -size +4M | while read -r big; do mv "$big" "$RESULT/$name-$(basename "$big")"; done
  tar -czf "$RESULT/$name.tgz" -C /tmp/lanes "$name"
done
for name in "${names[@]}"; do echo "== $name"; tail -15 "/tmp/lanes/$name/lane.log"; done
cat /tmp/lanes/table
ls -la "$RESULT"
