"""Hostile and careless use, second wave (issue 29): resuming only what this config
produced, one process per output directory for every stage command, bounded YAML, a store
that stays inside its source folders, SIGTERM, and small hostile inputs.

Marked ``reliability`` like tests/integration/test_reliability.py; nothing here trains a
model: stages are replaced by stand-ins where a test needs one under way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import ConfigError
from rlhf.stages import StageResult

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _one_line_error(capsys, *needles: str) -> str:
    """The one line of stderr (after a stage command's "[stage] running" header)."""
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.endswith("] running"))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------------------
# items 3 and 4: YAML aliases and absurd nesting


# each level repeats the one before nine times: *e stands for 9**5 strings (the issue's
# 1 KB bomb went on to 9**9 and gigabytes; five levels show the same thing cheaply)
_BOMB = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(4)) + "]"


def test_a_yaml_alias_bomb_in_a_recipe_is_refused_at_once(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(RECIPE.read_text().replace("seed: 0", f"seed: {_BOMB}", 1))
    assert main(["run", str(recipe), "--validate-only"]) == 2
    err = _one_line_error(capsys, str(recipe), "alias")
    assert len(err) < 500


def test_a_yaml_alias_in_an_override_is_refused(capsys):
    assert main(["run", str(RECIPE), "--validate-only", "seed={a: &a [x, x], b: [*a, *a]}"]) == 2
    _one_line_error(capsys, "override seed", "alias")


def test_a_long_wrong_value_is_not_formatted_whole_into_the_error(capsys):
    long_list = "[" + ", ".join(["123456789"] * 20000) + "]"  # 220 kB of YAML, under the limits
    assert main(["run", str(RECIPE), "--validate-only", f"seed={long_list}"]) == 2
    err = _one_line_error(capsys, "seed", "expected an integer")
    assert len(err) < 500, len(err)


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_a_recipe_nested_100000_levels_deep_is_one_line(tmp_path, capsys, opening, closing):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(f"seed: {opening * 100_000}1{closing * 100_000}\n")
    assert main(["run", str(recipe), "--validate-only"]) == 2
    _one_line_error(capsys, str(recipe), "nested")


def test_an_integer_of_5000_digits_and_keys_of_mixed_types_are_one_line(tmp_path, capsys):
    assert main(["run", str(RECIPE), "--validate-only", "seed=" + "9" * 5000]) == 2
    _one_line_error(capsys, "override seed")
    recipe = tmp_path / "keys.yaml"
    recipe.write_text("1: a\nb: c\n")
    assert main(["run", str(recipe), "--validate-only"]) == 2
    _one_line_error(capsys, "unknown key")



@pytest.mark.parametrize("text, key, line", [
    ("seed: 1\nname: a\nseed: 2\n", "seed", 3),
    ("ppo:\n  learning_rate: 1.0e-5\n  kl_coef: 0.1\n  learning_rate: 2.0e-5\n", "learning_rate", 4),
    ('{"seed": 1, "seed": 2}\n', "seed", 1),  # a JSON recipe is YAML too
])
def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path, capsys, text, key, line):
    """Issue 29 item 8: YAML (like JSON) keeps the last of two equal keys without a word."""
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--validate-only"]) == 2
    _one_line_error(capsys, str(recipe), f"{key!r}", f"line {line}", "twice")


# ----------------------------------------------------------------------------------------
# item 1: --resume continues only what this config produced


def _fake_stage(monkeypatch, name: str, body):
    """Replace stage ``name`` by ``body(cfg, resume)`` and input resolution by the identity."""
    import rlhf.resolve
    import rlhf.stages as stages

    def run(cfg, *, group=None, resume=False, task=None, registration=None):
        return body(cfg, resume)

    monkeypatch.setattr(rlhf.resolve, "resolve_inputs", lambda cfg, *args, **kwargs: cfg)
    monkeypatch.setitem(stages.STAGES, name, dataclasses.replace(stages.STAGES[name], run=run))


def _write_update(out: Path, n: int) -> Path:
    """A PPO-layout checkpoint written the way the PPO stage writes them."""
    from rlhf.checkpoint import write_checkpoint_dir

    return write_checkpoint_dir(out / "checkpoints", f"update-{n}", lambda d: (d / "state.json").write_text("{}"))


def test_a_fresh_start_moves_old_checkpoints_aside_and_every_checkpoint_carries_the_fingerprint(tmp_path, monkeypatch):
    from rlhf.config import PPOConfig
    from rlhf.stages import run_stage

    out = tmp_path / "ppo"
    seen = []

    def body(cfg, resume):
        seen.append((resume, sorted(p.name for p in (out / "checkpoints").iterdir())))
        _write_update(out, 1)

    _fake_stage(monkeypatch, "ppo", body)
    old = _write_update(out, 7)  # another run's checkpoint, newer than anything this run writes
    run_stage("ppo", PPOConfig(output_dir=str(out), learning_rate=1e-5))
    assert seen == [(False, ["rlhf_fingerprint.json"])]  # the stage started on an empty folder
    assert (out / "checkpoints.previous" / old.name / "COMPLETE").is_file()  # moved aside, not deleted
    stamp = json.loads((out / "checkpoints" / "rlhf_fingerprint.json").read_text())
    assert json.loads((out / "checkpoints" / "update-1" / "rlhf_fingerprint.json").read_text())["fingerprint"] \
        == stamp["fingerprint"]
    # resuming the same config continues; a second fresh start replaces the earlier .previous
    run_stage("ppo", PPOConfig(output_dir=str(out), learning_rate=1e-5), resume=True)
    assert seen[-1] == (True, ["rlhf_fingerprint.json", "update-1"])
    run_stage("ppo", PPOConfig(output_dir=str(out), learning_rate=1e-5))
    assert sorted(p.name for p in (out / "checkpoints.previous").iterdir()) == ["rlhf_fingerprint.json", "update-1"]


def test_resuming_a_checkpoint_of_another_config_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ppo"
    calls = []
    def body(cfg, resume):
        calls.append(resume)
        _write_update(out, 2)
        return StageResult("ppo", str(out), "base", {}, {})

    _fake_stage(monkeypatch, "ppo", body)
    assert main(["ppo", f"output_dir={out}", "learning_rate=1e-5"]) == 0
    capsys.readouterr()
    assert main(["ppo", "--resume", f"output_dir={out}", "learning_rate=2e-5"]) == 2
    _one_line_error(capsys, "--resume", str(out / "checkpoints" / "update-2"), "another config")
    assert calls == [False]  # the stage never started
    assert main(["ppo", "--resume", f"output_dir={out}", "learning_rate=1e-5"]) == 0
    assert calls == [False, True]


def test_resuming_a_checkpoint_without_a_fingerprint_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sft"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")  # written before stamps existed
    _fake_stage(monkeypatch, "sft", lambda cfg, resume: pytest.fail("the stage must not start"))
    assert main(["sft", "--resume", f"output_dir={out}", "dataset=d.jsonl"]) == 2
    _one_line_error(capsys, "--resume", "checkpoint-4", "no config fingerprint")


def test_the_issue_case_ppo_resume_after_a_fresh_start_of_another_config(ppo_config, tmp_path, monkeypatch):
    """PPO at lr 1e-5 to the end; the same directory at 2e-5, killed before its first
    checkpoint; then --resume at 2e-5 must train 2e-5 from the start (it loaded the 1e-5
    run's last checkpoint, ran 0 updates and published the 1e-5 weights as 2e-5)."""
    from safetensors.torch import load_file

    import rlhf.stages.ppo as ppo
    from rlhf.stages import run_stage

    common = dict(total_episodes=8, rollout_batch_size=4, save_steps=1, response_length=4,
                  output_dir=str(tmp_path / "ppo"))
    first = run_stage("ppo", ppo_config(learning_rate=1e-5, **common))
    weights = {k: v.clone() for k, v in load_file(f"{first.artifacts['policy']}/adapter_model.safetensors").items()}

    real_update = ppo.train_update

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for kill -9 before the first checkpoint

    monkeypatch.setattr(ppo, "train_update", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage("ppo", ppo_config(learning_rate=2e-5, **common))
    monkeypatch.setattr(ppo, "train_update", real_update)
    updates = []
    monkeypatch.setattr(ppo, "train_update", lambda *a, **k: updates.append(1) or real_update(*a, **k))
    second = run_stage("ppo", ppo_config(learning_rate=2e-5, **common), resume=True)
    assert len(updates) == 2  # both updates ran: nothing of the 1e-5 run was resumed
    got = load_file(f"{second.artifacts['policy']}/adapter_model.safetensors")
    assert any(not (got[k] == weights[k]).all() for k in weights)
    # and resuming the 2e-5 run's checkpoints under the 1e-5 config is refused
    with pytest.raises(ConfigError, match="another config"):
        run_stage("ppo", ppo_config(learning_rate=1e-5, **common), resume=True)


def test_sft_checkpoints_carry_the_fingerprint_and_a_changed_config_cannot_resume_them(tmp_path, capsys):
    from rlhf.tasks import write_task_files
    from rlhf.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    files = write_task_files(SyntheticTask(SyntheticTaskConfig(num_sft=16, num_pairs=8, num_ppo_prompts=4,
                                                               num_eval_prompts=4)), tmp_path / "task")
    out = tmp_path / "sft"
    args = ["sft", f"dataset={files['sft']}", f"output_dir={out}", "train.max_steps=2", "train.save_steps=1",
            "train.per_device_train_batch_size=4", "train.max_length=48", "eval_fraction=0"]
    assert main([*args, "train.learning_rate=1e-4"]) == 0
    stamp = json.loads((out / "checkpoints" / "rlhf_fingerprint.json").read_text())["fingerprint"]
    ckpts = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in ckpts] == ["checkpoint-1", "checkpoint-2"]
    for ckpt in ckpts:
        assert json.loads((ckpt / "rlhf_fingerprint.json").read_text())["fingerprint"] == stamp
    capsys.readouterr()
    assert main([*args, "train.learning_rate=2e-4", "--resume"]) == 2
    _one_line_error(capsys, "--resume", "checkpoint-2", "another config")


# ----------------------------------------------------------------------------------------
# item 2: every command that writes a run directory holds its lock; item 7: SIGTERM

# `rlhf <stage|run>` in a child whose stages are stand-ins that announce themselves and sleep
_CHILD = textwrap.dedent("""
    import dataclasses, sys, time
    import rlhf.resolve, rlhf.stages as stages
    from rlhf.cli import main

    def sleeper(cfg, **kw):
        print("stage started", flush=True)
        time.sleep(120)

    rlhf.resolve.resolve_inputs = lambda cfg, *args, **kwargs: cfg
    for name, stage in list(stages.STAGES.items()):
        stages.STAGES[name] = dataclasses.replace(stage, run=sleeper)
    sys.exit(main(sys.argv[1:]))
""")


def _start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = []
    while not lines or not lines[-1].startswith("stage started"):
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines) + proc.stderr.read()
    return proc


@pytest.mark.parametrize("stage", ["sft", "ppo"])  # every stage command goes through run_stage
def test_a_second_stage_command_into_the_same_output_dir_fails_at_once(tmp_path, stage):
    out = tmp_path / stage
    first = _start([stage, f"output_dir={out}", "dataset=d.jsonl" if stage != "ppo" else "prompts=p.jsonl"])
    try:
        second = subprocess.run([sys.executable, "-c", _CHILD, stage, f"output_dir={out}", "dataset=d.jsonl"
                                 if stage != "ppo" else "prompts=p.jsonl"],
                                capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"run directory {out} is in use by another rlhf run (pid {first.pid}" in second.stderr
        assert "stage started" not in second.stdout and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_sigterm_marks_the_stage_interrupted_releases_the_lock_and_exits_143(tmp_path):
    from rlhf.registry import Registry
    from rlhf.runs import RunLock

    run_dir = tmp_path / "run"
    child = _start(["run", str(RECIPE), "--output-dir", str(run_dir), "task.num_sft=8", "task.num_pairs=8",
                    "task.num_ppo_prompts=8", "task.num_eval_prompts=8"])
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    st = json.loads((run_dir / "pipeline.json").read_text())["stages"]["sft"]
    assert st["status"] == "interrupted", st
    with Registry.open() as reg:
        assert reg.resolve(st["run"]).metadata["status"] == "interrupted"
    RunLock(run_dir).acquire().release()
    RunLock(run_dir / "sft").acquire().release()


# ----------------------------------------------------------------------------------------
# item 6: `rlhf generate` on an adapter whose only weights are pickled


def test_generate_on_an_adapter_with_only_a_pickled_bin_is_one_line(tmp_path, capsys):
    import pickle

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "rlhf_adapter.json").write_text(json.dumps({"role": "policy", "base_path": "builtin:tiny"}))
    ran = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    assert main(["generate", str(adapter), "--prompt", "hi"]) == 2
    _one_line_error(capsys, str(adapter), "adapter_model.bin", "safetensors")
    assert not ran.exists()


# ----------------------------------------------------------------------------------------
# item 8: the low ones


def test_rlhf_run_on_an_emptied_registry_database_is_one_line(tmp_path, capsys):
    from rlhf.registry import Registry

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with Registry.open() as reg:
        reg.register_base("b", str(base), copy=True)
    (tmp_path / "home" / "registry" / "registry.db").write_bytes(b"")  # the database lost its entries
    assert main(["run", str(RECIPE), "--output-dir", str(tmp_path / "run"), "task.num_sft=8"]) == 1
    _one_line_error(capsys, "rlhf run: registry error", "rebuild")


def test_an_integer_no_run_can_mean_is_refused(capsys):
    assert main(["run", str(RECIPE), "--validate-only", "ppo.total_episodes=99999999999999999999999"]) == 2
    _one_line_error(capsys, "ppo.total_episodes", "64-bit")


def test_a_pipeline_checkpoint_folder_follows_the_umask(tmp_path):
    from rlhf.checkpoint import write_checkpoint_dir

    old = os.umask(0o022)
    try:
        d = write_checkpoint_dir(tmp_path / "checkpoints", "update-1", lambda d: None)
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 is widened to what the umask gives


def test_a_nan_in_samples_jsonl_does_not_break_the_run_page(tmp_path):
    import threading
    import urllib.request

    from rlhf.dashboard.cli import main as dashboard_main
    from rlhf.dashboard.server import make_server

    run = tmp_path / "runs" / "r"
    (run / "ppo").mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps({"name": "r", "stages": {"ppo": {"status": "completed"}}}))
    (run / "ppo" / "metrics.jsonl").write_text('{"step": 1, "kl/mean": 0.5}\n')
    (run / "ppo" / "samples.jsonl").write_text(
        '{"step": 1, "prompt": "p", "completion": "c", "score": NaN, "gold": Infinity, "length": NaN}\n'
        '{"step": NaN, "prompt": "p", "completion": "c", "score": 1.0}\n'
        '{"step": 1, "prompt": "p", "completion": "c d", "score": 0.5, "length": 2}\n')
    assert dashboard_main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    srv = make_server(tmp_path / "runs", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(srv.url + "run/r", timeout=60) as response:
            assert response.status == 200
    finally:
        srv.shutdown()


def test_data_list_with_rlhf_home_pointing_at_a_file_is_an_error(tmp_path, monkeypatch, capsys):
    home = tmp_path / "a-file"
    home.write_text("not a folder")
    monkeypatch.setenv("RLHF_HOME", str(home))
    assert main(["data", "list"]) == 1
    _one_line_error(capsys, str(home), "not a directory")


def test_a_utf16_jsonl_is_rejected_saying_utf16(tmp_path, capsys):
    rows = "".join(json.dumps({"prompt": p, "chosen": "b", "rejected": "c"}) + "\n" for p in "xyz")
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(rows.encode("utf-16"))  # with its byte-order mark, as Windows tools write it
    assert main(["data", "ingest", str(src), "--name", "pairs"]) == 1
    _one_line_error(capsys, "UTF-16", "pairs.jsonl")
    assert not (tmp_path / "home" / "data" / "pairs").exists()  # a failed ingest leaves no empty dataset folder


# ----------------------------------------------------------------------------------------
# item 8: a recipe's task.module is code; validating or showing the recipe does not run it

_LOUD_TASK = textwrap.dedent("""
    from pathlib import Path
    Path(__file__).with_name("ran").write_text("the module ran")

    class Loud:
        def prompts(self, split):
            return [{"prompt": "hi"}] if split == "train" else []
        def evaluate(self, prompt, completion):
            return 0.0
""")


@pytest.mark.parametrize("command", [["run", "--validate-only"], ["config", "show"]])
def test_validate_only_and_config_show_do_not_run_a_task_module(tmp_path, capsys, command):
    (tmp_path / "loud.py").write_text(_LOUD_TASK)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  module: loud.py:Loud\nsft: {dataset: sft.jsonl}\nreward: {dataset: pairs.jsonl}\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert main([*command, str(recipe)]) == 0
    assert not (tmp_path / "ran").exists()
    out = capsys.readouterr().out
    assert "loud.py:Loud" in out and "not imported" in out
    # what can be checked without running it still is: a missing file is one line
    recipe.write_text("task:\n  module: gone.py:Loud\n")
    assert main([*command, str(recipe)]) == 2
    _one_line_error(capsys, "task.module", "gone.py")


# ----------------------------------------------------------------------------------------
# item 8: a resume logs each row once, even at the last step; issue 28 item 5: the token
# counters continue from the checkpoint


def _logged(path: Path) -> list[dict]:
    """The rows of a step log without the clock's numbers (times, speeds)."""
    def timeless(key: str) -> bool:
        return key == "time" or key.endswith(("runtime", "_per_second", "preparation_time"))

    return [{k: v for k, v in json.loads(line).items() if not timeless(k)} for line in path.read_text().splitlines()]


def test_a_trl_stage_resumed_at_its_last_step_or_before_logs_each_row_once_and_counts_tokens_on(tmp_path):
    from rlhf.tasks import write_task_files
    from rlhf.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    files = write_task_files(SyntheticTask(SyntheticTaskConfig(num_sft=40, num_pairs=8, num_ppo_prompts=4,
                                                               num_eval_prompts=4)), tmp_path / "task")
    out = tmp_path / "sft"
    args = ["sft", f"dataset={files['sft']}", f"output_dir={out}", "train.max_steps=4", "train.save_steps=2",
            "train.logging_steps=1", "train.per_device_train_batch_size=4", "train.max_length=48", "eval_fraction=0.2"]
    assert main(args) == 0
    first = _logged(out / "metrics.jsonl")
    tokens = {r["step"]: r["num_tokens"] for r in first if "num_tokens" in r}
    assert sorted(tokens) == [1, 2, 3, 4] and tokens[1] < tokens[2] < tokens[3] < tokens[4]
    assert [r["step"] for r in first if set(r) == {"step", "eval_loss"}] == [4]  # the stage's final evaluation

    # killed after the last checkpoint (say while publishing): the resume trains no step
    assert main([*args, "--resume"]) == 0
    again = _logged(out / "metrics.jsonl")
    # every row once; no train summary of a call that trained nothing (its train_loss was 0/0)
    assert again == [r for r in first if "train_loss" not in r]
    assert json.loads((out / "metrics.json").read_text()).get("train_loss") != 0.0

    # killed after checkpoint-2: steps 3 and 4 are logged once more, their token counts go on from step 2's
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    assert main([*args, "--resume"]) == 0
    resumed = _logged(out / "metrics.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]
    assert {r["step"]: r["num_tokens"] for r in resumed if "num_tokens" in r} == tokens


def test_ppo_resumed_at_its_last_update_logs_its_final_evaluation_once(ppo_config, tmp_path):
    from rlhf.stages import run_stage

    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, save_steps=1, response_length=4)
    run_stage("ppo", cfg)
    out = Path(cfg.output_dir)
    first, first_samples = _logged(out / "metrics.jsonl"), _logged(out / "samples.jsonl")
    assert any("eval/score_mean" in r and r["step"] == 2 for r in first)  # the final evaluation, after update-2
    run_stage("ppo", cfg, resume=True)  # killed after the last checkpoint: no update runs, the evaluation does
    again = _logged(out / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in again] == [(r["step"], sorted(r)) for r in first]
    assert len(_logged(out / "samples.jsonl")) == len(first_samples)


# ----------------------------------------------------------------------------------------
# issue 28 item 5: a run under way or interrupted is provisional, and says what is to come


def test_an_interrupted_runs_summary_report_and_dashboard_are_provisional_and_list_the_stages_to_come(
        tmp_path, monkeypatch, capsys):
    import rlhf.pipeline as pipeline
    from rlhf.dashboard.cli import main as dashboard_main
    from rlhf.dashboard.data import list_runs, load_run
    from rlhf.dashboard.render import render_run
    from rlhf.pipeline import Pipeline, plan

    run_dir = tmp_path / "runs" / "tiny"
    interrupt = {"reward"}
    seen_summaries = []

    def stand_in(stage, cfg, **kw):
        seen_summaries.append(json.loads((run_dir / "summary.json").read_text()))  # written as the stage starts
        if stage in interrupt:
            raise KeyboardInterrupt
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        # (with gold_accuracy the summary need not build the tiny base to measure the reward model)
        return StageResult(stage, str(run_dir / stage), "base", {},
                           {"loss": 1.0, "gold_accuracy": 0.9, "eval_accuracy": 0.9, "eval_margin": 1.0,
                            "heldout_pairs": 100, "heldout_correct": 90, "heldout_accuracy": 0.9,
                            "heldout_margin": 1.0})  # what the reward gate reads

    monkeypatch.setattr(pipeline, "run_stage", stand_in)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(plan(RECIPE, run_dir, ["register=false"])).run()
    assert [(s["provisional"], s["stages_to_come"]) for s in seen_summaries] == [
        (True, ["sft", "reward", "ppo"]), (True, ["reward", "ppo"])]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["provisional"] is True and summary["stages_to_come"] == ["reward", "ppo"]  # pipeline order

    run = load_run(run_dir, with_lineage=False)
    assert [(s.name, s.status) for s in run.stages] == [("sft", "completed"), ("reward", "interrupted"),
                                                        ("ppo", "pending")]
    page = render_run(run)
    assert "Provisional" in page and "still to come: reward, ppo" in page
    (listed,) = list_runs(tmp_path / "runs")
    assert list(listed["stages"].items()) == [("sft", "completed"), ("reward", "interrupted"), ("ppo", "pending")]
    capsys.readouterr()
    out = tmp_path / "report.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out  # `rlhf report` says what it wrote
    assert "Provisional" in out.read_text()

    interrupt.clear()  # the rest runs: final numbers, nothing to come
    Pipeline(plan(RECIPE, run_dir, ["register=false"])).run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["provisional"] is False and summary["stages_to_come"] == []
    assert "Provisional" not in render_run(load_run(run_dir, with_lineage=False))
