#!/usr/bin/env bash
# The prepared device check of the PPO fast path (issue 13), on one GPU, inside 8 minutes:
#   1. CUDA bf16 correctness at the Qwen2.5-0.5B shape (scripts/_gpu_check.py): step-0 KL ~ 0,
#      first-minibatch ratio ~ 1, value = reward score at step 0, gradients with gradient
#      checkpointing on = off                                                      (<= 80 s)
#   2. the 0.5B benchmark, ours against TRL 1.12 full and LoRA (scripts/bench_ppo.py;
#      vocab 32k, 64 prompts x 64 tokens, 128-token responses, 4 x 4; one warm-up batch
#      and one measured batch per side; at most 90 s per side)                     (<= 230 s)
#   3. the size probe: the 32B shape's LoRA PPO update, capped at 80 GB of GPU memory
#      (does it fit on an 80 GB GPU?), gradient checkpointing, micro-batch 8       (<= 120 s)
#   4. the scoring phase with the frozen roles mixed and apart (scripts/bench_scoring.py;
#      ppo.mixed_adapter_scoring: 'auto' mixes them on CUDA only) at the 0.5B shape, bf16,
#      64 rows of 64 + 128 tokens, 1 and 3 reward members                          (<= 40 s)
#   then one JSON line, last: {"correctness": ..., "bench": ..., "size_probe": ..., "scoring": ..., "ok": ...}.
#
# Run on the device machine (the device tool), carrying the offline wheels:
#   python scripts/download_gpu_wheels.py        # here, once: .whl/ (git-ignored, ~2 MB)
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# CPU rehearsal of the same code path at tiny shapes (a test runs it):
#   bash scripts/gpu_check.sh --dry-run
# Results (logs, JSON) go to $OUT when set (the device tool's folder), else a temporary folder.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
cd "$(dirname "$0")/.."
REPO=$PWD
RES=${OUT:-$(mktemp -d)}
mkdir -p "$RES"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
START=$SECONDS
log() { echo "[gpu_check +$((SECONDS - START))s] $*" >&2; }

# 0. what the image lacks (datasets, ...), offline from .whl; trl goes into the bench's TRL venv
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -c "import sys; sys.path.insert(0, 'scripts'); import bench_ppo; from pathlib import Path; \
print('[gpu_check] offline install:', bench_ppo.install_missing_wheels(Path('.whl'), Path('.bench/site')) or 'nothing missing')" >&2
  export PYTHONPATH="$REPO/.bench/site:$PYTHONPATH"
fi
"$PY" -c "import datasets, pandas, pyarrow" 2>/dev/null \
  || log "warning: datasets/pandas/pyarrow missing: run scripts/download_gpu_wheels.py (--all) and carry .whl"

if [[ $DRY == 1 ]]; then
  CORR_ARGS=(--dry-run)
  # TRL 1.12 runs too when its wheel is in .whl (offline); GPU_CHECK_MODES="" skips it
  if [[ -z "${GPU_CHECK_MODES+x}" ]]; then ls .whl/trl-1.12.0-*.whl >/dev/null 2>&1 && GPU_CHECK_MODES=full,lora || GPU_CHECK_MODES=""; fi
  BENCH_ARGS=(--shape tiny --vocab 512 --batch 8 --prompt-len 8 --response-len 8 --num-minibatches 2 --ppo-epochs 1
              --n-batches 2 --modes "$GPU_CHECK_MODES" --generation static --compile off)
  PROBE_ARGS=(--max-size --shapes tiny --vocab 512 --batch 8 --prompt-len 8 --response-len 8 --num-minibatches 2
              --generation static --compile off)
  SCORE_ARGS=(--shape tiny --batch 8 --prompt-len 8 --response-len 8 --members 1,2 --repeats 1)
  T_CORR=300; T_BENCH=600; T_PROBE=300; T_SCORE=300
else
  CORR_ARGS=()
  # each bench worker (build, ours, TRL full, TRL LoRA) gets at most 90 s: a side that runs
  # over is left out of the table, the others still report
  BENCH_ARGS=(--shape 0.5B --n-batches 2 --modes "${GPU_CHECK_MODES-full,lora}" --timeout 90)
  PROBE_ARGS=(--max-size --shapes 32B --memory-limit-gb 80 --generation static --compile off --timeout 115)
  SCORE_ARGS=(--shape 0.5B --batch 64 --prompt-len 64 --response-len 128 --chunk 64 --members 1,3 --repeats 3)
  T_CORR=80; T_BENCH=230; T_PROBE=120; T_SCORE=40
fi

# 1. correctness
log "correctness"
timeout -k 5 $T_CORR "$PY" scripts/_gpu_check.py --out "$RES/correctness.json" "${CORR_ARGS[@]}" \
  >"$RES/correctness.log" 2>&1
log "correctness: exit $?"

# 2. benchmark against TRL 1.12
log "bench"
timeout -k 5 $T_BENCH "$PY" scripts/bench_ppo.py "${BENCH_ARGS[@]}" --trl-env "$REPO/.bench/trl112" \
  >"$RES/bench.log" 2>&1
log "bench: exit $?"
tail -n 1 "$RES/bench.log" >"$RES/bench.json"

# 3. size probe
log "size probe"
timeout -k 5 $T_PROBE "$PY" scripts/bench_ppo.py "${PROBE_ARGS[@]}" >"$RES/probe.log" 2>&1
log "size probe: exit $?"
tail -n 1 "$RES/probe.log" >"$RES/probe.json"

# 4. scoring phase: the frozen roles mixed and apart
log "scoring"
timeout -k 5 $T_SCORE "$PY" scripts/bench_scoring.py "${SCORE_ARGS[@]}" >"$RES/scoring.log" 2>&1
log "scoring: exit $?"
tail -n 1 "$RES/scoring.log" >"$RES/scoring.json"

# the tables for a reader, then the summary line last
grep -v '^{' "$RES/bench.log" | grep -v '^\[bench\]' | tail -n 30 >&2 || true
grep '^|\|^scoring phase' "$RES/scoring.log" >&2 || true
"$PY" - "$RES" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path

res, seconds = Path(sys.argv[1]), int(sys.argv[2])


def load(name):
    try:
        return json.loads((res / name).read_text())
    except Exception as e:  # a part that timed out or crashed: say so, keep the rest
        tail = (res / name.replace(".json", ".log")).read_text(errors="replace")[-400:] if (res / name.replace(".json", ".log")).exists() else ""
        return {"error": f"{type(e).__name__}: no result", "log_tail": tail}


corr, bench, probe = load("correctness.json"), load("bench.json"), load("probe.json")
scoring = load("scoring.json")
summary = {
    "ok": bool(corr.get("ok")) and "error" not in bench and probe.get("max_shape") is not None,
    "seconds": seconds,
    "correctness": {"ok": corr.get("ok"), **{k: {"ok": v["ok"], "value": v["value"], "tol": v["tol"]}
                                             for k, v in corr.get("checks", {}).items()}} if "checks" in corr else corr,
    "bench": bench,
    "size_probe": {k: probe.get(k) for k in ("max_shape", "peak_gb", "memory_limit_gb", "device")} | (
        {"results": probe["results"]} if "results" in probe else {"error": probe.get("error"), "log_tail": probe.get("log_tail")}),
    "scoring": scoring,
}
print(json.dumps(summary))
EOF
