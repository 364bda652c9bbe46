#!/usr/bin/env bash
# Run the whole test suite on the offline GPU machine (see docs/development.md).  The wheels the machine lacks
# travel in folders named .whl* at the project root (.whl/ from ../shared/gpu/fetch-wheels.sh; .whl-extra/ with
# bitsandbytes, textual, hypothesis; .whl-suite*/ with the rest of the test extra: pytest-xdist,
# pytest-textual-snapshot, wandb, mkdocs-material and their dependencies).  Whichever of them a call carries is
# installed into /tmp/site, which stays between calls on a warm machine, so the wheels can come over several
# calls when together they exceed one call's carry limit (64 MiB with the repository):
#   bash bench/gpu_suite.sh --install-only      # calls that only bring wheels
#   bash bench/gpu_suite.sh [PYTEST ARGS...]    # the last call: the suite on 12 workers (WORKERS=N to change)
set -eo pipefail
for dir in .whl*/; do
  dir=${dir%/}
  if compgen -G "$dir/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$dir"/*.whl >/dev/null 2>&1
    echo "installed $(ls "$dir"/*.whl | wc -l) wheels from $dir"
  fi
done
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
[ "$1" = "--install-only" ] && exit 0
python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1 || true
# -v names each test as it ends, so a call cut short by its time limit still says what ran and what failed
python3 -m pytest -v -n "${WORKERS:-12}" -p no:cacheprovider -p no:benchmark -rfEs --junitxml="${OUT:-/tmp}/gpu-suite.xml" "$@"
