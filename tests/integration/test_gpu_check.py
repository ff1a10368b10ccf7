"""scripts/gpu_check.sh and its correctness part, rehearsed on the CPU at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPTS / "_gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_correctness_checks_dry_run(gpu_check):
    """The step-0 invariants hold in fp32 on the tiny shape (the GPU run checks them in bf16)."""
    result = gpu_check.run(dry_run=True)
    checks = result["checks"]
    assert set(checks) == {"kl_step0", "ratio_first_minibatch", "value_equals_reward", "checkpointing_gradients"}
    for name in checks:
        assert checks[name]["ok"], (name, checks[name])
    assert checks["ratio_first_minibatch"]["clipfrac"] == 0.0
    # each role's backward runs inside that role (issue 12), so the recomputed forwards of
    # gradient checkpointing use the right adapter for the policy AND the value role
    assert checks["checkpointing_gradients"]["policy_rel_diff"] <= 1e-5
    assert checks["checkpointing_gradients"]["value_rel_diff"] <= 1e-5
    assert result["engine"] == "StaticEngine" and result["dtype"] == "float32"


@pytest.mark.slow
def test_gpu_check_sh_dry_run(tmp_path):
    """The whole device script on the CPU (ours only: GPU_CHECK_MODES=''), summary JSON last."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_MODES="", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=900)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) >= {"ok", "seconds", "correctness", "bench", "size_probe"}
    assert {"kl_step0", "ratio_first_minibatch", "value_equals_reward", "checkpointing_gradients"} <= set(last["correctness"])
    assert last["bench"]["shape"] == "tiny" and last["bench"]["ours_eps_per_s"] > 0
    assert min(last["bench"][f"ours_{k}_s"] for k in ("generate", "score", "update")) >= 0
    assert last["size_probe"]["max_shape"] == "tiny" and last["size_probe"]["peak_gb"] > 0
    assert [(r["members"], r["part"]) for r in last["scoring"]["rows"]] == [
        (1, "frozen"), (1, "whole"), (2, "frozen"), (2, "whole")]
    assert max(r["max_diff_score"] for r in last["scoring"]["rows"]) < 1e-5
    for name in ("correctness.json", "bench.log", "probe.log", "scoring.log"):
        assert (tmp_path / name).is_file()
