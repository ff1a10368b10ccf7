#!/usr/bin/env bash
# Install what is needed, then run the test suite (tests marked slow are left out; run them
# with: .venv/bin/python -m pytest -m slow).
#
# Three environments run: the newest libraries pip resolves (the whole suite), then the GPU
# image's library versions (scripts/gpu-image-versions.txt, overlaid on the same venv) for the
# tests of the paths real runs take: PPO, the stages and the pipeline, then the vLLM engine's
# tests in .venv-vllm (scripts/test_vllm.sh; built on first use, about 6 minutes). All must pass.
# The first two print their 25 slowest tests (--durations=25), so a test that grows slow shows in CI.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The dashboard's browser tests need Debian's chromium; they skip when it is absent.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
    || echo "chromium could not be installed; browser tests will be skipped"
fi
# The registry tests run against a real PostgreSQL server they start themselves (initdb +
# pg_ctl on a temporary directory); they need Debian's postgresql package and skip without it.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1 \
    || echo "postgresql could not be installed; the registry's PostgreSQL tests will be skipped"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

FLOORS_TESTS=(tests/unit/ppo tests/integration/ppo tests/integration/test_stage_cli.py)
if [ "$#" -gt 0 ]; then  # arguments: run just those, in the default environment
  exec .venv/bin/python -m pytest -m "not slow" -q "$@"
fi

echo "== 1/2: newest libraries: the whole suite"
.venv/bin/python -m pytest -m "not slow" -q --durations=25
main_rc=$?
echo "== 2/2: GPU image library versions ($(grep -v '^#' scripts/gpu-image-versions.txt | tr '\n' ' ')): PPO and stage tests"
PYTHONPATH=.venv/gpu-image-floors .venv/bin/python -c \
  "import transformers, peft, accelerate; print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
existing=()
for t in "${FLOORS_TESTS[@]}"; do [ -e "$t" ] && existing+=("$t"); done
PYTHONPATH=.venv/gpu-image-floors .venv/bin/python -m pytest -m "not slow" -q --durations=25 "${existing[@]}"
floors_rc=$?
echo "== 3/3: the vLLM engine in its own environment (scripts/test_vllm.sh)"
bash scripts/test_vllm.sh
vllm_rc=$?
echo "== newest libraries: exit $main_rc; GPU image versions: exit $floors_rc; vLLM: exit $vllm_rc"
[ "$main_rc" = 0 ] && [ "$floors_rc" = 0 ] && [ "$vllm_rc" = 0 ]
