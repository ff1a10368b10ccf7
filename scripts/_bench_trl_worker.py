"""TRL 1.12's side of ``scripts/bench_ppo.py``; runs inside the TRL 1.12 environment.

Usage (the benchmark calls it; it is not meant to be run by hand)::

    .bench/trl112/bin/python scripts/_bench_trl_worker.py --workspace DIR --mode full|lora --out RESULT.json

Reads the workspace written by ``bench_ppo.build_workspace`` (``spec.json``, ``model/``,
``prompt_ids.json``), trains ``trl.experimental.ppo.PPOTrainer`` for ``spec.n_batches`` rollout
batches and writes per-batch times and peak memory as JSON. It imports nothing from the
project, so it runs against whatever trl the interpreter provides (checked to be 1.12.0).

TRL is driven to match our side: per_device_train_batch_size = batch with one accumulation
step and ``num_mini_batches`` minibatches, so each minibatch is one forward/backward and one
optimizer step (as ours with micro_batch_size = minibatch); no stop token, so every response
is ``response_length`` tokens; no sample generations, no saving, no reporting.

Phase times: TRL exposes only its overall episodes/s, so the module-level functions that
``PPOTrainer.train`` calls are wrapped: time inside ``batch_generation`` is generation, time
inside no-grad ``forward``/``get_reward`` is scoring, and the rest of a batch is the update
(advantages, PPO epochs, logging, TRL's cache emptying). Each wrapper synchronises the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

EXPECTED_TRL = "1.12.0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run TRL 1.12's PPOTrainer for the PPO benchmark.")
    p.add_argument("--workspace", required=True)
    p.add_argument("--mode", choices=["full", "lora"], required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    if trl.__version__ != EXPECTED_TRL:
        raise SystemExit(f"this worker benchmarks trl {EXPECTED_TRL}; {sys.executable} has trl {trl.__version__}")
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    work = Path(args.workspace)
    spec = json.loads((work / "spec.json").read_text())
    prompt_ids = json.loads((work / "prompt_ids.json").read_text())
    cuda = torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # ---- phase timers around the functions PPOTrainer.train looks up in its module --------
    phase = {"generate_s": 0.0, "score_s": 0.0}

    def timed(fn, key, only_no_grad=False):
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            phase[key] += time.perf_counter() - t
            return out

        return wrapper

    ppo_module.batch_generation = timed(ppo_module.batch_generation, "generate_s")
    ppo_module.forward = timed(ppo_module.forward, "score_s", only_no_grad=True)
    ppo_module.get_reward = timed(ppo_module.get_reward, "score_s", only_no_grad=True)

    updates: list[dict] = []

    class BatchTimer(TrainerCallback):
        """One row per rollout batch, from the end of the previous one (or train start)."""

        def on_train_begin(self, *a, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync()
            now = time.perf_counter()
            total = now - self.t
            updates.append({"total_s": total, "generate_s": phase["generate_s"], "score_s": phase["score_s"],
                            "update_s": total - phase["generate_s"] - phase["score_s"]})
            phase.update(generate_s=0.0, score_s=0.0)
            self.t = now

    # ---- models, data, config -----------------------------------------------------------
    model_dir = str(work / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, num_labels=1)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    peft_config, ref = None, None
    if args.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    else:
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    dataset = Dataset.from_dict({"input_ids": prompt_ids[: spec["batch"] * spec["n_batches"]]})

    out_dir = tempfile.mkdtemp(prefix="trl-ppo-", dir=work)
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["num_minibatches"],
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["batch"] * spec["n_batches"],
        local_rollout_forward_batch_size=min(64, spec["batch"]),  # TRL's default, capped by the batch
        response_length=spec["response_len"],
        stop_token=None,
        stop_token_id=None,
        temperature=0.7,
        learning_rate=1e-4 if args.mode == "lora" else 3e-6,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=False,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=peft_config,
                         callbacks=[BatchTimer()])
    trainer.train()

    if len(updates) != spec["n_batches"]:
        raise SystemExit(f"expected {spec['n_batches']} rollout batches, timed {len(updates)}")
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS"
    import transformers

    result = {"updates": updates, "peak_gb": peak, "peak_kind": kind, "mode": args.mode, "trl": trl.__version__,
              "transformers": transformers.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
