#!/usr/bin/env bash
# The whole test run, as CI runs it: lint, types, import contracts, then every test (slow end-to-end ones included).
# Run after scripts/setup.sh (`make test` does both).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv/bin

"$VENV/ruff" check . || exit 1
"$VENV/ruff" format --check . || exit 1
"$VENV/mypy" || exit 1
# The layer rule (pyproject [tool.importlinter]): cli → flows → backends / stack → core, no cycles.
"$VENV/lint-imports" --no-cache || exit 1

# The copy pre-trained tiny model that the quickstart pipeline test and the learning test start from,
# built once here, alone, into a cache that outlives the run (named by its recipe, like DeepSpeed's ops
# in .venv/torch_extensions): built inside the suite, it was built by whichever test came first while
# the other worker held the second core, 653 s instead of ~110 s (measured, 2026-12-04).
export ARGUS_TEST_TINY_MODEL_CACHE="${ARGUS_TEST_TINY_MODEL_CACHE:-$PWD/.argus/test-models}"
"$VENV/python" -c 'import os, sys; from pathlib import Path; from argus.models import tiny
print("tiny model for the tests:", tiny.built("qwen2", "mini", 0, Path(os.environ["ARGUS_TEST_TINY_MODEL_CACHE"])))' || exit 1

# Two workers, one file each at a time (a module's fixtures are built once): most tests wait on
# servers, sandboxes and subprocesses more than they compute, so two share the 2 cores (measured on
# 2 cores: 28m43 on two workers against ~38 min one test at a time; pinning OMP_NUM_THREADS=1 made it
# slower, 33m57, the vLLM servers of the end-to-end tests most of all). Tests that share a session
# resource across workers coordinate through a file lock (the tiny model cache).
"$VENV/python" -m pytest -n "${ARGUS_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ "$rc" = 5 ]; then
  # pytest's "no tests ran": a test run that checks nothing must not pass.
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
