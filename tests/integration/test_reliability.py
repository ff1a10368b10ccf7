"""Hostile and careless use of `rlhf run` (issue 17): each case fails cleanly, early, and
leaves the run directory and the registry telling the truth.

Every test here is marked ``reliability`` (run the group with ``pytest -m reliability``);
none trains a model: stages are replaced by stand-ins where a test needs a stage to be
under way, so the group runs in seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest

import rlhf.config as config_module
from rlhf.cli import main
from rlhf.config import ConfigError, PipelineConfig, from_dict
from rlhf.tasks.synthetic import SyntheticTaskConfig

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # a default runs/<name> lands in the test's directory


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------------------
# item 4: every numeric config field has a validated range


def _config_classes() -> list[type]:
    """Every config dataclass: those of rlhf.config and every dataclass their fields nest."""
    found, todo = [], [c for c in vars(config_module).values()
                       if dataclasses.is_dataclass(c) and isinstance(c, type) and c.__module__ == "rlhf.config"]
    todo.append(SyntheticTaskConfig)
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for tp in typing.get_type_hints(cls).values():
            todo += [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t) and isinstance(t, type)]
    return found


def _numeric_fields() -> list[tuple[type, dataclasses.Field, type]]:
    out = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if t in (int, float)]
            if kinds:
                out.append((cls, f, kinds[0]))
    return out


NUMERIC = _numeric_fields()


def _outside(spec: str, kind: type) -> list:
    """Values just outside ``spec`` (see rlhf.config.check_range)."""
    eps = 1 if kind is int else 1e-6
    bad = []
    alts = [a.strip() for a in spec.split(" or ")]
    exact = [float(a) for a in alts if a.lstrip("-").replace(".", "").isdigit()]
    for alt in alts:
        if alt.startswith((">", "<")):
            op, bound = alt.split()
            b = float(bound)
            bad.append({">": b, ">=": b - eps, "<": b, "<=": b + eps}[op])
            if op.startswith(">"):
                bad.append(b - 1000)
        elif alt.startswith(("[", "(")):
            lo, hi = (float(x) for x in alt[1:-1].split(","))
            bad += [lo if alt[0] == "(" else lo - eps, hi if alt[-1] == ")" else hi + eps]
    bad = [v for v in bad if v not in exact]
    return [int(v) if kind is int else v for v in bad]


def test_the_enumeration_sees_every_config_class():
    names = {c.__name__ for c in _config_classes()}
    assert {"TrainArgs", "LoraConfigSpec", "SFTConfig", "RewardConfig", "PPOConfig", "PipelineConfig",
            "SyntheticTaskConfig"} <= names
    assert len(NUMERIC) >= 55  # 58 when this was written


@pytest.mark.parametrize("cls, f, kind", NUMERIC, ids=[f"{c.__name__}.{f.name}" for c, f, _ in NUMERIC])
def test_every_numeric_field_has_a_range_that_is_checked(cls, f, kind):
    spec = f.metadata.get("range")
    assert spec, f"{cls.__name__}.{f.name} has no 'range' in its metadata"
    default = cls().__getattribute__(f.name)
    config_module.check_range(f.name, default, spec)  # the default is inside its own range
    bad = _outside(spec, kind) + ([math.nan, math.inf, -math.inf] if kind is float else [])
    assert bad or spec == "any"
    for value in bad:
        with pytest.raises(ConfigError, match=rf"x\.{f.name} must be"):
            from_dict(cls, {f.name: value}, prefix="x")


@pytest.mark.parametrize("override, key", [
    ("sft.train.num_train_epochs=0", "sft.train.num_train_epochs"),
    ("sft.train.num_train_epochs=-1", "sft.train.num_train_epochs"),
    ("ppo.total_episodes=-5", "ppo.total_episodes"),
    ("reward.train.per_device_train_batch_size=-8", "reward.train.per_device_train_batch_size"),
    ("sft.train.learning_rate=-1e-4", "sft.train.learning_rate"),
    ("ppo.learning_rate=.nan", "ppo.learning_rate"),
    ("ppo.response_length=0", "ppo.response_length"),
    ("ppo.kl_coef=.nan", "ppo.kl_coef"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef"),
    ("ppo.num_mini_batches=0", "ppo.num_mini_batches"),
    ("ppo.per_device_train_batch_size=0", "ppo.per_device_train_batch_size"),
    ("sft.eval_fraction=1.0", "sft.eval_fraction"),
    ("sft.lora.r=0", "sft.lora.r"),
    ("task.num_pairs=-1", "task.num_pairs"),
    ("seed=-3", "seed"),
])
def test_validate_only_refuses_out_of_range_values(capsys, override, key):
    assert main(["run", str(RECIPE), "--validate-only", override]) == 2
    _one_line_error(capsys, f"{key} must be")
    assert not Path("runs").exists()


# ----------------------------------------------------------------------------------------
# item 5: model inputs must hold safetensors weights, checked before the first stage


def test_a_pickled_base_is_refused_before_any_stage(tmp_path, capsys):
    base = tmp_path / "pickled-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")  # never unpickled
    run_dir = tmp_path / "run"
    assert main(["run", str(RECIPE), "--output-dir", str(run_dir), f"model.name_or_path={base}"]) == 2
    _one_line_error(capsys, "model.name_or_path", str(base), "pytorch_model.bin", "safetensors")
    assert not run_dir.exists()  # no stage started, nothing written


def test_a_pickled_adapter_is_refused_when_it_resolves(tmp_path):
    from rlhf.resolve import resolve_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match=r"ppo.sft_adapter: .* only pickled weights \(adapter_model.bin\)"):
        resolve_adapter("ppo.sft_adapter", str(adapter))


# ----------------------------------------------------------------------------------------
# item 7: bad input is a one-line error naming the file, exit 2


def test_an_invalid_yaml_override_is_one_line(capsys):
    assert main(["run", str(RECIPE), "--validate-only", "ppo.kl_coef=[0.1, "]) == 2
    _one_line_error(capsys, "override ppo.kl_coef: invalid YAML value")


def test_a_non_utf8_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(RECIPE.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    assert main(["run", str(recipe), "--validate-only"]) == 2
    _one_line_error(capsys, str(recipe), "not UTF-8")


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "run"):
        assert main(["run", str(RECIPE), "--validate-only", "--output-dir", str(out)]) == 2
        _one_line_error(capsys, str(blocker), "is not a directory")


# ----------------------------------------------------------------------------------------
# item 9: a recipe name cannot move the run directory out of runs/


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".hidden", "a\\b", "x\n"])
def test_a_run_name_with_path_parts_is_a_config_error(tmp_path, capsys, name):
    recipe = tmp_path / "r.yaml"
    text = RECIPE.read_text()
    assert "\nname: tiny\n" in text  # replaced, not given twice (a key given twice is refused)
    recipe.write_text(text.replace("\nname: tiny\n", f"\nname: {json.dumps(name)}\n"))
    assert main(["run", str(recipe), "--validate-only"]) == 2
    _one_line_error(capsys, "name:")
    with pytest.raises(ConfigError, match="not a valid run name"):
        from_dict(PipelineConfig, {"name": name})
    assert not (tmp_path / "escaped").exists() and not Path("runs").exists()


# ----------------------------------------------------------------------------------------
# items 3 and 8: one process per run directory; dead, failed and interrupted runs say so

# A child process that runs the tiny pipeline with its stages replaced by a stand-in that
# announces itself and then sleeps (or raises), so tests can kill or race it mid-stage.
_CHILD = textwrap.dedent("""
    import sys, time
    import rlhf.pipeline as pipeline
    from rlhf.pipeline import Pipeline, plan

    run_dir, behaviour = sys.argv[1], sys.argv[2]

    def stand_in(stage, cfg, **kw):
        print(f"stage {stage} started", flush=True)
        if behaviour == "interrupt":
            raise KeyboardInterrupt
        if behaviour == "fail":
            raise RuntimeError("loss is NaN at step 3")
        time.sleep(3600)  # holds the run lock until the test kills it

    pipeline.run_stage = stand_in
    Pipeline(plan(sys.argv[3], run_dir, ["task.num_sft=8", "task.num_pairs=8", "task.num_ppo_prompts=8",
                                          "task.num_eval_prompts=8"])).run()
""")


def _start_child(run_dir: Path, behaviour: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir), behaviour, str(RECIPE)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = []
    while not lines or not lines[-1].startswith("stage sft started"):
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines) + proc.stderr.read()  # the child ended before its stage started
    return proc


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def _run_status(ref: str) -> tuple[str, str | None]:
    from rlhf.registry import Registry

    with Registry.open() as reg:
        meta = reg.resolve(ref).metadata
    return meta["status"], meta.get("reason")


def test_a_second_run_into_the_same_dir_fails_at_once_and_a_killed_one_is_marked(tmp_path):
    run_dir = tmp_path / "run"
    first = _start_child(run_dir, "sleep")
    try:
        second = subprocess.run([sys.executable, "-m", "rlhf", "run", str(RECIPE), "--output-dir", str(run_dir)],
                                capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                timeout=900)
        assert second.returncode == 2, second.stderr
        assert f"run directory {run_dir} is in use by another rlhf run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert _state(run_dir)["stages"]["sft"]["status"] == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead process's lock; the next start marks its stage killed
    sft_run = _state(run_dir)["stages"]["sft"]["run"]
    assert _run_status(sft_run)[0] == "running"
    interrupted = _start_child(run_dir, "interrupt")
    interrupted.wait(timeout=900)
    assert _run_status(sft_run) == ("killed", "its process ended without finishing the stage (killed or crashed)")
    # ... and Ctrl-C during the new attempt marks that attempt interrupted, here and in the registry
    st = _state(run_dir)["stages"]["sft"]
    assert st["status"] == "interrupted" and st["run"] != sft_run
    assert _run_status(st["run"])[0] == "interrupted"


def test_a_failed_stage_is_marked_failed_with_its_reason(tmp_path):
    run_dir = tmp_path / "run"
    child = _start_child(run_dir, "fail")
    child.wait(timeout=900)
    st = _state(run_dir)["stages"]["sft"]
    assert st["status"] == "failed" and st["reason"] == "RuntimeError: loss is NaN at step 3"
    assert _run_status(st["run"]) == ("failed", "RuntimeError: loss is NaN at step 3")


def test_pipeline_json_of_a_killed_run_is_marked_killed_on_the_next_start(tmp_path, monkeypatch):
    import rlhf.pipeline as pipeline
    from rlhf.pipeline import Pipeline, plan

    run_dir = tmp_path / "run"
    first = _start_child(run_dir, "sleep")
    first.send_signal(signal.SIGKILL)
    first.wait()
    seen = {}

    def stand_in(stage, cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", stand_in)
    original = Pipeline._mark_dead_stages

    def spy(self, registry):
        original(self, registry)
        seen["after_start"] = _state(run_dir)["stages"]["sft"]["status"]

    monkeypatch.setattr(Pipeline, "_mark_dead_stages", spy)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(plan(RECIPE, run_dir, ["task.num_sft=8"])).run(resume=True)
    assert seen["after_start"] == "killed"


def test_the_lock_is_released_when_the_run_ends(tmp_path, monkeypatch):
    import rlhf.pipeline as pipeline
    from rlhf.pipeline import Pipeline, plan
    from rlhf.runs import RunDirLocked, RunLock

    def stand_in(stage, cfg, **kw):
        with pytest.raises(RunDirLocked):  # held while a stage runs
            RunLock(tmp_path / "run").acquire()
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "run_stage", stand_in)
    with pytest.raises(RuntimeError, match="stop here"):
        Pipeline(plan(RECIPE, tmp_path / "run", ["register=false"])).run()
    RunLock(tmp_path / "run").acquire().release()  # free again after the run ended


# ----------------------------------------------------------------------------------------
# item 8: a resumed stage logs each step once


def _rows(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("layout", ["update-{}/COMPLETE", "checkpoint-{}/trainer_state.json"])
def test_resume_drops_metric_rows_past_the_checkpoint(tmp_path, monkeypatch, layout):
    import rlhf.resolve
    import rlhf.stages as stages
    from rlhf.config import PPOConfig

    out = tmp_path / "ppo"
    for step, name in ((2, layout), (4, layout.replace("COMPLETE", "partial").replace("trainer_state", "x"))):
        marker = out / "checkpoints" / name.format(step)
        marker.parent.mkdir(parents=True)
        marker.write_text("{}")  # step 4 is incomplete: the stage resumes from step 2
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6)))
    (out / "samples.jsonl").write_text("".join(json.dumps({"step": s, "prompt": "p"}) + "\n" for s in (0, 2, 4)))
    seen = {}

    def fake_run(cfg, **kw):
        seen.update(metrics=_rows(out / "metrics.jsonl"), samples=_rows(out / "samples.jsonl"))

    monkeypatch.setattr(rlhf.resolve, "resolve_inputs", lambda cfg, *_: cfg)
    monkeypatch.setitem(stages.STAGES, "ppo", dataclasses.replace(stages.STAGES["ppo"], run=fake_run))
    cfg = PPOConfig(output_dir=str(out))
    # the checkpoints were written under this config (rlhf.runs.prepare_checkpoints checks it)
    from rlhf.config import to_dict
    from rlhf.runs import FINGERPRINT_FILE, config_fingerprint

    (out / "checkpoints" / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": config_fingerprint(to_dict(cfg))}))
    stages.run_stage("ppo", cfg, resume=True)
    assert seen == {"metrics": [0, 1, 2], "samples": [0, 2]}
    stages.run_stage("ppo", cfg, resume=False)  # started afresh: every old row goes
    assert seen == {"metrics": [], "samples": []}


# ----------------------------------------------------------------------------------------
# a full disk while a stage publishes its artifact


def _publish(out: Path, write):
    from rlhf.stages.common import publish

    return publish(out, "adapter", write, role="sft", base="/base", config={"a": 1})


def test_a_full_disk_during_publish_names_the_path_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    _publish(out, lambda d: (d / "adapter_model.safetensors").write_text("v1"))

    def full(d: Path):
        (d / "adapter_model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "adapter_model.safetensors"))

    with pytest.raises(OSError, match=re.escape(f"no space left on the device of {out} while publishing {out / 'adapter'}")) as e:
        _publish(out, full)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # no .tmp-* left behind
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "v1"  # the old artifact is intact


@pytest.mark.parametrize("writer", ["write_json", "save_yaml"])
def test_a_full_disk_during_a_state_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer):
    from rlhf.config import save_yaml
    from rlhf.atomic import write_json

    write = {"write_json": write_json, "save_yaml": save_yaml}[writer]
    target = tmp_path / "pipeline.json"
    write({"status": "completed"}, target) if writer == "save_yaml" else write(target, {"status": "completed"})
    before = target.read_text()
    real_write_text = Path.write_text

    def full(self, text, *a, **k):
        real_write_text(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=re.escape(f"while writing {target}")):
        write({"status": "x"}, target) if writer == "save_yaml" else write(target, {"status": "x"})
    monkeypatch.undo()
    assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.json"]


def test_a_really_full_disk_during_publish(tmp_path):
    """The same on a 4 MiB tmpfs that fills up (needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(OSError, match=re.escape(f"no space left on the device of {disk}")) as e:
            _publish(disk, lambda d: (d / "adapter_model.safetensors").write_bytes(b"\0" * (8 << 20)))
        assert e.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
