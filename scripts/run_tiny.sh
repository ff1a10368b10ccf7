#!/usr/bin/env bash
# Install what is needed, then run the embedded tiny pipeline (SFT -> reward -> PPO) on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/rlhf run pipelines/tiny.yaml "$@"
