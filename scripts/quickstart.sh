#!/usr/bin/env bash
# The local quickstart: `argus run examples/quickstart.yaml` after scripts/setup.sh (`make quickstart`
# does both). It starts the platform stack if needed (state in .argus/, or $ARGUS_HOME) and runs the
# pipeline flow: data → tool environment → SFT → RL → evaluation (base, SFT, RL) → registry → promotion
# to production. Re-running it skips the stages that already finished.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/argus run examples/quickstart.yaml "$@"
