#!/usr/bin/env bash
# The local quickstart: every stage that exists today runs for real, from the CLI, in order.
# Run after scripts/setup.sh (`make quickstart` does both). State lives in .argus/ (ARGUS_HOME).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARGUS=.venv/bin/argus
SPEC=examples/quickstart.yaml
HOME_DIR="${ARGUS_HOME:-.argus}"
DATA="$HOME_DIR/quickstart/data"

step() { printf '\n\033[1;34m==> %s\033[0m\n' "$*"; }

step "validate $SPEC"
"$ARGUS" validate "$SPEC"

step "platform stack (S3 endpoint, MLflow, Prefect)"
"$ARGUS" stack up
"$ARGUS" stack check "$SPEC"   # a Prefect flow that records the spec in MLflow, artifacts in S3

step "miniature DeepEyesV2 suite (gold trajectories through the gVisor sandbox and the search proxy)"
if [ -f "$DATA/manifest.json" ]; then
  echo "reusing $DATA (generation is deterministic; delete it to regenerate)"
else
  "$ARGUS" data generate --out "$DATA" --seed 0 --sft-size 200 --rl-size 100 --eval-size 60
fi

step "cold-start SFT of the tiny Qwen2 (torchrun, 2 processes, DeepSpeed ZeRO-2; resumes if interrupted)"
"$ARGUS" train sft --config "$SPEC" --data "$DATA/sft/sft.json"

step "evaluation with live tools (vLLM CPU build + sandbox + search): base model, then the SFT model"
"$ARGUS" eval --model "$HOME_DIR/models/tiny-qwen2-seed0" --data "$DATA" --max-turns 6 --max-tokens 256
"$ARGUS" eval --model "s3://argus-models/quickstart/quickstart-sft" --data "$DATA" --max-turns 6 --max-tokens 256

cat <<'TXT'

Done: data, SFT and evaluation ran for real; the MLflow and Prefect UIs are at the URLs above.
Not built yet: the Prefect pipeline that runs these stages as one flow with resumable stages, the
registry (candidate -> staging -> production) and vLLM serving behind a stable endpoint.
Stop the platform with: .venv/bin/argus stack down
TXT
