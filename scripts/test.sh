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

"$VENV/python" -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  # pytest's "no tests ran": a test run that checks nothing must not pass.
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
