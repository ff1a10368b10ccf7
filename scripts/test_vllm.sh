#!/usr/bin/env bash
# Build (cached) the vLLM environment and run the tests marked `vllm` (tests/integration/vllm)
# in it; prints pytest's summary and exits with its status. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== vLLM engine tests (.venv-vllm)"
exec .venv-vllm/bin/python -m pytest -m "vllm and not slow" -q tests/integration/vllm "$@"
