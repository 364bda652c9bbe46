#!/usr/bin/env bash
# Install fluxkiln on the offline GPU machine (see docs/development.md) and run what follows on its command line.
# Wheels the machine lacks travel in .whl/ (../shared/gpu/fetch-wheels.sh) and, for the GPU test run,
# .whl-extra/ (bitsandbytes, textual, hypothesis, ...).  Usage: bash bench/run_on_gpu.sh CMD [ARGS...]
set -eo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(ls .whl-extra/*.whl 2>/dev/null) >/dev/null
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1 || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$@"
