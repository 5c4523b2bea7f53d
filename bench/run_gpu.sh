#!/usr/bin/env bash
# A lent GPU session in one call, from the repository root (bench/README.md, "On a lent GPU"):
#   bash bench/run_gpu.sh --plan                    # the phases, their limits and estimates
#   bash bench/run_gpu.sh                           # build, op tests, benches: each phase timed
#   PHASES=token_stats,tree bash bench/run_gpu.sh   # some phases again
# Results and logs go to $OUT (default ./gpu-out); bench/phases.py says what each file holds.
# Pure-Python wheels the machine lacks travel in .whl/ (`make gpu-wheels` fetches them here).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/appo-site .whl/*.whl \
        && export PYTHONPATH=/tmp/appo-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 bench/phases.py "$@"
