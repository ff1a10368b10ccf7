"""The stage table: the CLI runs a stage through it, with inputs resolved first; the pipeline,
the resolution and the CLI read every stage from it."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig
from rlhf.stages import STAGES, Stage, StageResult

ROOT = Path(__file__).resolve().parents[2]


def test_table_lists_the_stages_in_pipeline_order():
    assert list(STAGES) == ["sft", "reward", "ppo", "dpo", "kto"]
    assert [STAGES[s].config for s in STAGES] == [SFTConfig, RewardConfig, PPOConfig, DPOConfig, KTOConfig]
    # what a recipe's stage list must put before each stage
    # (ppo needs reward too only when ppo.rewards scores with the reward model: checked by the pipeline)
    assert {s: STAGES[s].requires for s in STAGES} == {"sft": (), "reward": ("sft",), "ppo": ("sft",),
                                                       "dpo": ("sft",), "kto": ("sft",)}
    from rlhf.cli import STAGE_NAMES

    assert STAGE_NAMES == tuple(STAGES)  # the CLI's copy (for a torch-free --help) is the table's


def test_cli_runs_a_stage_from_the_table_with_resolved_inputs(tiny_assets, tmp_path, monkeypatch, capsys):
    from rlhf.cli import main
    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", str(tiny_assets.base)).ref
    rm = reg.register_adapter("rm", "reward", str(tiny_assets.reward_adapter), base=base)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    seen = {}

    def fake_run(cfg, *, group, resume, task, registration):
        seen["cfg"] = cfg
        assert registration is None  # a stage run alone registers nothing
        return StageResult(stage="ppo", output_dir=cfg.output_dir, base=cfg.model.name_or_path,
                           artifacts={"policy": "p"}, metrics={"m": 1.0})

    monkeypatch.setitem(stages.STAGES, "ppo", dataclasses.replace(STAGES["ppo"], run=fake_run))
    assert main(["ppo", f"model.name_or_path={tiny_assets.base}", "reward_adapter=rm:1", f"prompts={prompts}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    assert seen["cfg"].reward_adapter == str(rm.path)  # the registry reference arrived resolved
    printed = json.loads(capsys.readouterr().out)
    assert printed == dataclasses.asdict(StageResult(stage="ppo", output_dir=str(tmp_path / "out"),
                                                     base=str(tiny_assets.base), artifacts={"policy": "p"},
                                                     metrics={"m": 1.0}))


def test_an_unresolvable_input_stops_the_stage_before_it_runs(tmp_path, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setitem(stages.STAGES, "sft", dataclasses.replace(STAGES["sft"], run=lambda *a, **k: pytest.fail("stage ran")))
    assert main(["sft", f"dataset={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "sft.dataset: file not found" in capsys.readouterr().err


def test_an_unknown_stage_section_is_an_error(tmp_path):
    from rlhf.config import ConfigError
    from rlhf.pipeline import plan

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {enabled: true}\nstages: [sft]\norpo: {beta: 0.1}\n")
    with pytest.raises(ConfigError, match="orpo"):
        plan(recipe, tmp_path / "run")
    recipe.write_text("task: {enabled: true}\nstages: [sft]\nppo: 3\n")
    with pytest.raises(ConfigError, match="ppo: expected a mapping"):
        plan(recipe, tmp_path / "run")


def test_dpo_paths_resolve_against_the_recipe_folder_from_any_working_directory(tmp_path, monkeypatch):
    """dpo.dataset and dpo.eval_prompts are data inputs of DPO's row, so a relative path in a
    recipe means the file beside the recipe (it used to stay relative to the working directory)."""
    from rlhf.pipeline import plan

    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    for name in ("pairs.jsonl", "eval.jsonl", "sft.jsonl"):
        (recipes / "data" / name).write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"}\n')
    (recipes / "dpo.yaml").write_text("stages: [sft, dpo]\nsft: {dataset: data/sft.jsonl}\n"
                                      "dpo: {dataset: data/pairs.jsonl, eval_prompts: ./data/eval.jsonl}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = plan(Path("..") / "recipes" / "dpo.yaml", tmp_path / "run")
    assert p.dpo.dataset == str((recipes / "data" / "pairs.jsonl").resolve())
    assert p.dpo.eval_prompts == str((recipes / "data" / "eval.jsonl").resolve())
    assert p.sft.dataset == str((recipes / "data" / "sft.jsonl").resolve())


def test_a_data_file_counts_by_its_bytes_not_its_path(tmp_path):
    """A run directory copied elsewhere (its task files with it) keeps its fingerprints, so
    `rlhf run --output-dir COPY --from ppo` reruns PPO alone; a changed byte still reruns."""
    from rlhf.pipeline import Pipeline, plan

    def fingerprints(folder: str, text: str) -> dict:
        data = tmp_path / folder / "pairs.jsonl"
        data.parent.mkdir(exist_ok=True)
        data.write_text(text)
        recipe = tmp_path / folder / "r.yaml"
        recipe.write_text("stages: [sft, dpo]\nsft: {dataset: pairs.jsonl}\ndpo: {dataset: pairs.jsonl}\n")
        return Pipeline(plan(recipe, tmp_path / folder / "run")).fingerprints()

    row = '{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"}\n'
    first, moved = fingerprints("a", row), fingerprints("b", row)
    assert first["sft"] == moved["sft"] and first["dpo"] == moved["dpo"]
    changed = fingerprints("c", row.replace('"c"}', '"d"}'))
    assert changed["sft"] != first["sft"] and changed["dpo"] != first["dpo"]


def test_a_new_stage_is_its_module_plus_its_row(tmp_path, monkeypatch, capsys):
    """The pipeline, the input resolution and the CLI read the table: a row added here (a
    stand-in for a KTO stage) is validated, wired, fingerprinted, run and offered as a command
    without any other file changing."""
    from rlhf.cli import COMMANDS
    from rlhf.pipeline import Pipeline, plan

    ran = {}

    @dataclasses.dataclass
    class ToyConfig:
        model: dict = dataclasses.field(default_factory=dict)
        seed: int = 0
        output_dir: str = ""
        report_to: list = dataclasses.field(default_factory=lambda: ["local"])
        sft_adapter: str = ""
        dataset: str = ""
        beta: float = 0.1

    def run(cfg, *, group, resume, task, registration):
        ran["cfg"] = cfg
        return StageResult(stage="toy", output_dir=cfg.output_dir, base="b", artifacts={}, metrics={"loss": 1.0})

    row = Stage(ToyConfig, run, "run the toy stage alone", requires=("sft",),
                inputs={"dataset": stages.Input("data")}, wired={"sft_adapter": "sft/adapter"},
                task_files={"dataset": "pairs"}, outputs=("adapter",))
    monkeypatch.setitem(STAGES, "toy", row)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {enabled: true, num_sft: 4, num_pairs: 8, num_ppo_prompts: 4, num_eval_prompts: 2}\n"
                      "stages: [sft, toy]\ntoy: {beta: 0.5}\n")
    p = plan(recipe, tmp_path / "run")
    assert (p.toy.beta, p.toy.sft_adapter, p.toy.dataset) == (0.5, str(tmp_path / "run" / "sft" / "adapter"),
                                                             p.task_files["pairs"])
    fps = Pipeline(p).fingerprints()
    recipe.write_text(recipe.read_text().replace("beta: 0.5", "beta: 0.6"))
    fps2 = Pipeline(plan(recipe, tmp_path / "run")).fingerprints()
    assert fps2["toy"] != fps["toy"] and fps2["sft"] == fps["sft"]
    recipe.write_text(recipe.read_text().replace("toy: {beta: 0.6}", "toy: {beta: 0.6, sft_adapter: x}"))
    with pytest.raises(Exception, match="toy.sft_adapter: set by the pipeline"):
        plan(recipe, tmp_path / "run")
    from rlhf.cli import main

    assert main(["toy", "--help"]) == 0
    assert "Run the toy stage alone" in capsys.readouterr().out
    assert "toy" not in COMMANDS  # `rlhf --help` lists the table as it was when rlhf.cli was imported


def test_the_trl_stage_skeleton_steps(tmp_path):
    """The plain functions every TRL-trainer stage is built from (rlhf.stages.common): the
    resolved config beside the artifacts, training resumed from the last complete checkpoint,
    an atomic publish of what the trainer holds, metrics.json and the StageResult."""
    import yaml

    from rlhf.stages import common

    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), dataset="d.jsonl")
    out, main = common.begin(cfg)
    assert main and yaml.safe_load((out / "config.yaml").read_text())["dataset"] == "d.jsonl"

    calls = []

    class Trainer:  # the parts of a transformers Trainer the skeleton touches
        state = types.SimpleNamespace(global_step=4)

        def train(self, resume_from_checkpoint=None):
            calls.append(("train", resume_from_checkpoint))
            return types.SimpleNamespace(training_loss=1.25)

        def add_callback(self, callback):  # the checkpoint stamper (rlhf.runs.stamp_checkpoint)
            calls.append(("callback", type(callback).__name__))

    class Tracker:
        def attach(self, trainer):
            calls.append(("attach",))

    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "checkpoint-8").mkdir()  # incomplete: no trainer_state.json
    assert common.train(Trainer(), Tracker(), out, resume=True) is None  # no step after checkpoint-4's: no loss
    assert common.train(Trainer(), Tracker(), out, resume=False, attach=False) == 1.25
    assert calls == [("attach",), ("callback", "StampCheckpoints"), ("train", str(out / "checkpoints" / "checkpoint-4")),
                     ("callback", "StampCheckpoints"), ("train", None)]

    path = common.publish_trained(Trainer(), out, "adapter", lambda tmp, state: (tmp / "w.safetensors").write_text(
        str(state)), role="sft", base="b", config={"k": 1})
    assert (Path(path) / "w.safetensors").read_text() == "None"  # nothing sharded: the model's own weights
    assert json.loads((Path(path) / "rlhf_adapter.json").read_text())["role"] == "sft"
    result = common.finish(cfg, out, main, "sft", {"adapter": path}, {"loss": 1.5}, {"dataset": "d.jsonl"})
    assert json.loads((out / "metrics.json").read_text()) == {"loss": 1.5}
    assert (result.stage, result.artifacts, result.base) == ("sft", {"adapter": path}, cfg.model.name_or_path)


def test_kto_summary_uses_the_dpo_keys_with_kto_in_their_place():
    """The KTO stage's numbers enter the pipeline summary (its row's contribution) under DPO's key
    names, ``kto`` for ``dpo``."""
    # reported by the summary convention (rlhf.summary): SFT initial/, the KTO policy final/
    m = {"eval_loss": 0.4, "eval_rewards_margins": 0.2, "initial/eval/gold_mean": -0.2, "initial/eval/gold_se": 0.03,
         "final/eval/gold_mean": 0.1, "final/eval/gold_se": 0.04, "final/eval/kl_mean": 1.5, "final/eval/kl_se": 0.1,
         "final/eval/gold_win_rate_mean": 0.7, "final/eval/gold_win_rate_se": 0.02}
    out: dict = {}
    STAGES["kto"].summary.add(out, {"status": "completed", "metrics": m}, True, True)
    assert (out["kto_eval_loss"], out["kto_reward_margin"], out["kl_kto_sft"]) == (0.4, 0.2, 1.5)
    assert (out["gold_reward_sft"], out["gold_reward_kto"], out["gold_win_rate_kto_sft"]) == (-0.2, 0.1, 0.7)
    # (0.1 - -0.2) / hypot(0.03, 0.04) = 0.3 / 0.05
    assert out["gold_improvement_kto_in_se"] == pytest.approx(6.0)
    assert not any("dpo" in k for k in out)


def test_make_reproducible_fixes_threads_and_deterministic_kernels(monkeypatch):
    import torch

    from rlhf.config import ConfigError
    from rlhf.stages import DEFAULT_NUM_THREADS, make_reproducible

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        monkeypatch.delenv("RLHF_NUM_THREADS", raising=False)
        assert make_reproducible() == DEFAULT_NUM_THREADS == torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("RLHF_NUM_THREADS", "1")
        assert make_reproducible() == 1
        monkeypatch.setenv("RLHF_NUM_THREADS", "0")  # torch's default: left as it is
        assert make_reproducible() == 1
        monkeypatch.setenv("RLHF_NUM_THREADS", "many")
        with pytest.raises(ConfigError, match=r"\$RLHF_NUM_THREADS: 'many' is not a whole number"):
            make_reproducible()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_pipeline_exports_its_thread_count_to_the_stages(tmp_path, monkeypatch):
    import os

    from rlhf.pipeline import Pipeline, plan

    monkeypatch.delenv("RLHF_NUM_THREADS", raising=False)
    p = plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "run", ["num_threads=3"], check_inputs=False)
    seen = {}
    monkeypatch.setattr(Pipeline, "_run", lambda self, *a: seen.setdefault("threads", os.environ["RLHF_NUM_THREADS"]))
    Pipeline(p).run()
    assert seen["threads"] == "3"


def _stage_names_in(path: Path) -> list[str]:
    """Where ``path`` names a stage of the table in code: a string that is a stage name or starts a
    config key or artifact path with one (``"ppo"``, ``"ppo.rewards"``, ``"sft/adapter"``, also in
    f-strings), or an attribute or keyword of that name (``plan.ppo``). Docstrings and comments
    are prose and do not count."""
    import ast
    import re

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = "|".join(STAGES)
    keyish = re.compile(rf"(?<![\w.-])({names})([./:]\w|$)")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in STAGES or keyish.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in STAGES:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in STAGES:
            found.append(f"{path.name}:{node.lineno}: {node.arg}=")
    return sorted(found)


@pytest.mark.parametrize("module", ["pipeline.py", "resolve.py", "cli.py"])
def test_the_pipeline_the_resolution_and_the_cli_name_no_stage(module):
    """What they know of a stage comes from its row of the stage table."""
    assert _stage_names_in(ROOT / "rlhf" / module) == []


def test_the_stage_name_check_sees_a_stage_named(tmp_path):
    code = tmp_path / "m.py"
    code.write_text('"""Runs sft, then ppo."""\nx = st.get("ppo", {})\ny = f"{a}ppo.rewards"\nz = plan.dpo\n'
                    'w = "reward model"  # prose\n')
    assert _stage_names_in(code) == ["m.py:2: 'ppo'", "m.py:3: 'ppo.rewards'", "m.py:4: .dpo"]
