#!/usr/bin/env bash
# Long fuzzing run (`make fuzz`): python_tests/test_fuzz.py under the "long" hypothesis profile, 100,000 random
# (not derandomised) examples per backend and test; failures are kept in hypothesis's example database
# (.hypothesis/) and replayed first on the next run. Extra arguments go to pytest, e.g. `scripts/fuzz.sh -k cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
MOB_FUZZ_PROFILE=long exec "$PY" -m pytest -q -p no:cacheprovider python_tests/test_fuzz.py "$@"
