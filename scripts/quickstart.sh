#!/usr/bin/env bash
# The local quickstart: everything that exists today runs for real; nothing here prints made-up numbers.
# Run after scripts/setup.sh (`make quickstart` does both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARGUS=.venv/bin/argus
SPEC=examples/quickstart.yaml

"$ARGUS" validate "$SPEC"
"$ARGUS" stack up
# A real Prefect flow: records the spec in MLflow and checks its artifacts landed in the S3 endpoint.
"$ARGUS" stack check "$SPEC"

cat <<'TXT'

The platform stack is up and wired together (Prefect → MLflow → S3).
Not built yet, so not run here: data generation, cold-start SFT, evaluation with tools, registry,
and promotion to vLLM serving. `make quickstart` will run them from examples/quickstart.yaml as they land.

Browse the MLflow and Prefect UIs at the URLs above; stop everything with: .venv/bin/argus stack down
TXT
