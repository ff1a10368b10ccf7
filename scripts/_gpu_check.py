"""Correctness part of ``scripts/gpu_check.sh``: our PPO's step-0 invariants on one device.

Usage (gpu_check.sh calls it)::

    python scripts/_gpu_check.py --out correctness.json              # CUDA, 0.5B shape, bf16
    python scripts/_gpu_check.py --out correctness.json --dry-run    # CPU, tiny shape, fp32

Builds the shape in memory (``bench_ppo.build_in_memory``: random base, random sft and reward
LoRA, policy = copy of sft, value = copy of reward), samples one rollout with the configured
engine, scores it and checks, with a tolerance per dtype (fp32 tight, bf16 loose: the roles
run through different kernels, e.g. the mixed-adapter batch of the frozen roles):

  * ``kl_step0``: the policy's and reference's logprobs agree (KL per token ~ 0);
  * ``ratio_first_minibatch``: on the first minibatch of the first epoch the PPO ratio is 1
    (the rollout logprobs are what the training forward computes), clipfrac 0;
  * ``value_equals_reward``: the value at the last real token equals the reward score;
  * ``checkpointing_gradients``: one minibatch's accumulated gradients (policy and value
    roles, several micro-batches) are the same with gradient checkpointing on and off.

Writes one JSON object (``{"ok": bool, "checks": {name: {"ok", "value", "tol"}}, ...}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ppo  # noqa: E402  (scripts/ is not a package)


class _GradRecorder:
    """An optimizer stand-in for ``_ppo_update``: records each step's gradients, changes nothing."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params)}]
        self.steps: list[list] = []

    def zero_grad(self, set_to_none: bool = True):
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def step(self):
        self.steps.append([None if p.grad is None else p.grad.detach().float().clone()
                           for p in self.param_groups[0]["params"]])


class _NoSchedule:
    def step(self):
        pass

    def get_last_lr(self):
        return [0.0]


def _rel_diff(a: list, b: list) -> float:
    """||a - b|| / ||b|| over a list of gradients (inf when one side lacks a gradient)."""
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b) if x is not None)
    den = sum(float(y.norm() ** 2) for y in b if y is not None)
    missing = sum((x is None) != (y is None) for x, y in zip(a, b))
    return float("inf") if missing or den == 0 else (num / den) ** 0.5


def run(dry_run: bool) -> dict:
    import torch

    from rlhf import ppo as F
    from rlhf import estimators, scoring
    from rlhf.stages import ppo as stage

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if dry_run:
        spec = bench_ppo.BenchSpec(shape="tiny", batch=8, prompt_len=8, response_len=8, num_minibatches=2,
                                   ppo_epochs=1, n_batches=1, vocab=512, dtype="float32", micro_batch=2,
                                   generation="static", compile="off")
    else:
        spec = bench_ppo.BenchSpec(shape="0.5B", batch=16, prompt_len=64, response_len=64, num_minibatches=2,
                                   ppo_epochs=1, n_batches=1, vocab=32000, dtype="bfloat16", micro_batch=4,
                                   generation="hf", compile="off")
    bf16 = spec.dtype == "bfloat16"
    tol = {"kl_step0": 2e-2 if bf16 else 1e-5, "ratio_first_minibatch": 2e-2 if bf16 else 1e-5,
           "value_equals_reward": 5e-2 if bf16 else 1e-5, "checkpointing_gradients": 2e-2 if bf16 else 1e-5}
    t0 = time.time()
    s, cfg = bench_ppo.build_in_memory(spec, device)
    model = s.model
    torch.manual_seed(spec.seed)
    sampled, _ = stage.sample(s, cfg, 0)
    batch = scoring.score_rollout(model, sampled, cfg, chunk=cfg.per_device_train_batch_size * 2, suffix=s.score_suffix)
    mask = batch.response_mask.bool()
    checks: dict[str, dict] = {}

    # step 0: policy == sft copy, so KL per token ~ 0
    kl = (batch.logprobs - batch.ref_logprobs)[mask].abs()
    checks["kl_step0"] = {"value": float(kl.max()), "mean": float(kl.mean())}
    # value at the last real token == reward score (critic initialised from the reward model)
    with torch.no_grad(), scoring.train_mode(model, False):
        v_last = scoring.last_token_scores(model, "value", batch, s.score_suffix)
    checks["value_equals_reward"] = {"value": float((v_last - batch.scores).abs().max()),
                                     "score_abs_mean": float(batch.scores.abs().mean())}

    # first minibatch of the first epoch: ratio 1 (spy on the policy loss the update calls)
    beta = cfg.kl_coef
    scores, kl_tok, rewards = stage.shaped_rewards(batch, cfg, beta)
    adv, returns = estimators.advantages_and_returns(batch, rewards, scores, kl_tok, cfg, beta, None)
    first: dict = {}
    original = F.policy_loss

    def spy(logprobs, old_logprobs, advantages, m, *a, **kw):
        if not first:
            r = (logprobs.detach() - old_logprobs)[m.bool()]
            first.update(max_abs_log_ratio=float(r.abs().max()), ratio_mean=float(r.exp().mean()))
        loss, st = original(logprobs, old_logprobs, advantages, m, *a, **kw)
        if "clipfrac" not in first:
            first["clipfrac"] = float(st["clipfrac"])
        return loss, st

    def grads(checkpointing: bool) -> list:
        lm = model.base_lm
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()
        rec = _GradRecorder(model.trainable_parameters("policy") + model.trainable_parameters("value"))
        one = dataclasses.replace(cfg, num_ppo_epochs=1, num_mini_batches=1, max_grad_norm=0.0,
                                  per_device_train_batch_size=cfg.per_device_train_batch_size)
        stage._ppo_update(model, rec, _NoSchedule(), batch, adv, returns, one, beta, 0)
        return rec.steps[0]

    F.policy_loss = spy
    try:
        g_off = grads(False)
    finally:
        F.policy_loss = original
    checks["ratio_first_minibatch"] = {"value": first["max_abs_log_ratio"], "ratio_mean": first["ratio_mean"],
                                       "clipfrac": first["clipfrac"]}
    g_on = grads(True)
    n_policy = len(model.trainable_parameters("policy"))
    checks["checkpointing_gradients"] = {
        "value": max(_rel_diff(g_on[:n_policy], g_off[:n_policy]), _rel_diff(g_on[n_policy:], g_off[n_policy:])),
        "policy_rel_diff": _rel_diff(g_on[:n_policy], g_off[:n_policy]),
        "value_rel_diff": _rel_diff(g_on[n_policy:], g_off[n_policy:])}
    for name, c in checks.items():
        c["tol"] = tol[name]
        c["ok"] = bool(c["value"] <= tol[name])
    if checks["ratio_first_minibatch"]["clipfrac"] != 0.0:
        checks["ratio_first_minibatch"]["ok"] = False
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks, "shape": spec.shape, "dtype": spec.dtype,
            "device": bench_ppo.device_name() if cuda else "cpu", "engine": type(s.engine).__name__,
            "seconds": round(time.time() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Step-0 correctness checks of our PPO on this device.")
    p.add_argument("--out", required=True, help="Where to write the JSON result.")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, fp32 (the same code path).")
    args = p.parse_args(argv)
    result = run(args.dry_run)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
