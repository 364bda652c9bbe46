#!/usr/bin/env bash
# Run the whole test suite on the offline GPU machine (see docs/development.md, "On a GPU machine").  The wheels
# the machine lacks travel in folders named .whl* at the project root (.whl/ from ../shared/gpu/fetch-wheels.sh;
# .whl-extra/ with bitsandbytes, textual, hypothesis; .whl-suite*/ with the rest of the test extra: pytest-xdist,
# pytest-timeout, pytest-textual-snapshot, wandb, mkdocs-material and their dependencies, plus setuptools and
# wheel, which the plugin-install tests need to build a plugin offline).  Whichever of them a call carries is
# installed into /tmp/site, which stays between calls on a warm machine, so the wheels can come over several
# calls when together they exceed one call's carry limit (64 MiB with the repository):
#   bash bench/gpu_suite.sh --install-only           # calls that only bring wheels
#   bash bench/gpu_suite.sh [PYTEST ARGS...]         # the suite on 12 workers (WORKERS=N to change)
#   bash bench/gpu_suite.sh --failed FILE [ARGS...]  # only the tests named in FILE (one node id a line), one
#                                                    # process, no xdist: e.g. the gpu-failed.txt of a run
# NO_INSTALL=1 skips the installs (bench/gpu_lanes.sh installs once for every lane of a call).
# Whatever cuts the call short, $OUT (default /tmp/gpu-suite) keeps gpu-tests.jsonl (every failure with its
# traceback, written as each test ends), gpu-failed.txt (the failed node ids) and gpu-suite.log (the -v output).
# TIMEOUT: seconds per test (default 120); CALL_LIMIT: the call's limit in seconds (default 600): pytest is
# interrupted (SIGINT: it still prints its summary) 60 s before it, counted from the start of this script.
set -eo pipefail
OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
install() {
  for dir in .whl*/; do
    dir=${dir%/}
    if compgen -G "$dir/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$dir"/*.whl >"$OUT/pip-$dir.log" 2>&1 || { tail -20 "$OUT/pip-$dir.log"; return 1; }
      echo "installed $(ls "$dir"/*.whl | wc -l) wheels from $dir"
    fi
  done
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . \
    >"$OUT/pip-fluxkiln.log" 2>&1 || { echo "installing fluxkiln failed:"; tail -20 "$OUT/pip-fluxkiln.log"; return 1; }
  [ "$1" = "--install-only" ] || python3 -m compileall -q -j 16 /tmp/site >/dev/null 2>&1 || true
}
[ -n "${NO_INSTALL:-}" ] || install "$1" || exit 1
export PYTHONPATH=/tmp/site:$PWD/bench PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -c "import setuptools.command.bdist_wheel" 2>/dev/null || python3 -c "import setuptools, wheel" 2>/dev/null ||
  echo "warning: no setuptools >= 70.1 (or setuptools + wheel) here: the plugin-install tests skip"
[ "$1" = "--install-only" ] && exit 0
# "--opt=VALUE" for every option with a path: pytest takes any argument not starting with "-" for a path when it
# looks for its rootdir and configfile ("--live-report /tmp/x" made /tmp/x the rootdir, so pyproject.toml's
# testpaths went unread and plugins/example/tests was collected too); -c names the configfile outright
common=(-c pyproject.toml -v --tb=short -p no:cacheprovider -p no:benchmark -p pytest_live_report --live-report="$OUT"
        --timeout "${TIMEOUT:-120}" -rfEs)
budget=$(( ${CALL_LIMIT:-600} - SECONDS - 60 ))
if [ "$1" = "--failed" ]; then
  mapfile -t ids < <(grep -v '^\s*\(#\|$\)' "$2")
  shift 2
  set -- -p no:xdist "${common[@]}" "$@" "${ids[@]}"
else
  set -- -n "${WORKERS:-12}" "${common[@]}" --junitxml="$OUT/gpu-suite.xml" "$@"
fi
# -v names each test as it ends; SIGINT at the budget makes pytest stop and still print its summary
timeout --signal=INT --kill-after=30 "$budget" python3 -m pytest "$@" 2>&1 | tee "$OUT/gpu-suite.log"
