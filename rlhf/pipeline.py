"""Run a staged recipe: SFT -> reward model -> PPO (and/or DPO, KTO), with caching, --from and --resume.

The run directory (``runs/<recipe stem>`` by default) holds ``pipeline.json`` (each
stage's status, fingerprint, inputs, outputs and final metrics), one folder per stage, and
``summary.json``. A stage is skipped when it completed before with the same fingerprint: a
hash of its resolved config and of its inputs (data file hashes and the fingerprints of
the stages it consumes). Every config is validated before any model is loaded.

The recipe's ``stages`` (default ``[sft, reward, ppo]``; e.g. ``[sft, dpo]``, ``[sft, kto]`` or
``[sft, reward, ppo, dpo]``) names the stages that run, in order; each must come after the
stages it consumes (``Stage.requires`` in the stage table, :mod:`rlhf.stages`, which also says
what each stage reads, publishes and hashes; this module names no stage).

Each stage runs through :func:`rlhf.stages.run_stage` (the stage table the CLI uses too),
which resolves its inputs first. With a task (``task.enabled``), the task's rows are written
to ``<run_dir>/task/`` and read like user data, and its gold reward judges the result.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import summary
from rlhf.atomic import write_json
from rlhf.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    check_run_name,
    from_dict,
    load_yaml,
    to_dict,
)
from rlhf.resolve import check_base, check_input
from rlhf.runs import file_hash as _file_hash, fingerprint as _fingerprint
from rlhf.stages import STAGES, run_stage
from rlhf.stages.common import Registration, safe_name as _safe_name
from rlhf.tasks import Task


@dataclass
class Plan:
    """A validated pipeline: the recipe plus one resolved config per stage of the stage table
    (every stage's, also those the recipe does not run: a stage may inherit their settings)."""

    recipe: Path
    run_dir: Path
    pipeline: PipelineConfig
    configs: dict[str, Any]  # stage name -> its typed config, model/seed/output_dir and wired inputs filled in
    task_files: dict | None  # name -> path of the task's files (None without a task)
    stages: tuple[str, ...]  # the recipe's stages, in the order they run (validated: _check_stages)
    task_obj: Task | None = None  # the recipe's task, built once by plan()

    def __getattr__(self, name: str) -> Any:
        # plan.ppo, plan.dpo, ...: a stage's config by its name
        configs = self.__dict__.get("configs", {})
        if name in configs:
            return configs[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def task(self) -> Task | None:
        """The recipe's task (embedded or the user's task.module), or None without one."""
        return self.task_obj


class RewardGateFailed(ConfigError):
    """The reward model failed the quality gate; the pipeline stops before PPO. (A
    ConfigError, so the CLI reports it as one line: the fix is in the recipe or the data.)"""


# Recipe values that may be paths besides the stages' data inputs (Stage.inputs of the stage
# table); relative ones resolve against the recipe's folder.
_PATH_KEYS = (("model", "name_or_path"), ("model", "chat_template"))
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz", ".jinja", ".j2", ".py")


def _recipe_relative(value, base: Path):
    """``value`` resolved against ``base`` when it is a relative path: it starts with ./ or
    ../, ends like a file, or exists under ``base``. Hub ids, store references and built-in
    names pass through."""
    if not isinstance(value, str) or not value or value.startswith(("/", "~", "builtin:")):
        return value
    if "{{" in value or "{%" in value:  # an inline Jinja template
        return value
    if value.startswith(("./", "../")) or value.lower().endswith(_DATA_SUFFIXES) or (base / value).exists():
        return str((base / value).resolve())
    return value


def _path_keys() -> list[tuple[str, str]]:
    return [*_PATH_KEYS, *((stage, key) for stage, row in STAGES.items()
                           for key, spec in row.inputs.items() if spec.kind != "adapter")]


def _resolve_recipe_paths(data: dict, base: Path) -> dict:
    for section, key in _path_keys():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = _recipe_relative(node[key], base)
    task = data.get("task")
    if isinstance(task, dict) and isinstance(task.get("module"), str) and ".py:" in task["module"]:
        path, _, attr = task["module"].rpartition(":")
        task["module"] = f"{_recipe_relative(path, base)}:{attr}"
    ppo = data.get("ppo")
    if isinstance(ppo, dict) and isinstance(ppo.get("watchdog_judge"), str) and ".py:" in ppo["watchdog_judge"]:
        path, _, attr = ppo["watchdog_judge"].rpartition(":")
        ppo["watchdog_judge"] = f"{_recipe_relative(path, base)}:{attr}"
    for entry in (ppo.get("rewards") if isinstance(ppo, dict) else None) or []:  # {fn: file.py:func}, recipe-relative
        if isinstance(entry, dict) and isinstance(entry.get("fn"), str) and ".py:" in entry["fn"]:
            path, _, attr = entry["fn"].rpartition(":")
            entry["fn"] = f"{_recipe_relative(path, base)}:{attr}"
    return data


def _stage_dict(pipe: PipelineConfig, section: dict, stage: str, run_dir: Path) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{stage}: expected a mapping of {stage} settings, got {type(section).__name__}")
    data = dict(section)
    for key in ("model", "seed", "output_dir"):
        if key in data:
            raise ConfigError(f"{stage}.{key}: set it at the top level of the recipe, not per stage")
    data["model"] = to_dict(pipe.model)
    data["seed"] = pipe.seed
    data["output_dir"] = str(run_dir / stage)
    data.setdefault("report_to", list(pipe.report_to))
    return data


def plan(recipe: str | Path, output_dir: str | Path | None = None, overrides: list[str] = (),
         check_inputs: bool = True, import_task: bool = True) -> Plan:
    """Load and validate a recipe (and overrides); raise ConfigError naming the bad key or file.

    Each stage section (``sft:``, ``ppo:``...) becomes its row's typed config; a section that is
    no stage of the table is an unknown key. ``check_inputs`` also checks that data files and
    store references exist (off to validate a recipe's schema on a machine without its data).
    Without ``import_task`` a ``task.module`` is checked but not imported (its code does not
    run: ``--validate-only``, ``config show``); the plan then assumes it supplies every task
    file the recipe leaves unset, and cannot be run (``task_obj`` is None)."""
    recipe = Path(recipe)
    data = apply_overrides(_resolve_recipe_paths(load_yaml(recipe), recipe.resolve().parent), list(overrides))
    sections = {stage: data.pop(stage) for stage in STAGES if stage in data}
    pipe = from_dict(PipelineConfig, data)
    if not pipe.name:
        check_run_name(recipe.stem, f"name (from the recipe file name {recipe.name})")
        pipe.name = recipe.stem
    run_dir = Path(output_dir) if output_dir else Path("runs") / pipe.name
    for d in (run_dir, *run_dir.parents):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"--output-dir {run_dir}: {d} exists and is not a directory")
    check_base(pipe.model.name_or_path)

    stages = _check_stages(pipe.stages)
    stage_data = {s: _stage_dict(pipe, sections.get(s) or {}, s, run_dir) for s in STAGES}
    from rlhf.tasks import TASK_FILES, check_task_module, load_task, provided_files, task_file_name

    unimported = bool(pipe.task.module) and not import_task
    if unimported:
        check_task_module(pipe.task, recipe.resolve().parent)
    task = None if unimported else load_task(pipe.task, recipe.resolve().parent)
    task_files = None
    if task is not None or unimported:
        task_dir = run_dir / "task"
        provided = TASK_FILES if unimported else provided_files(task)
        # the names write_task_files gives them (the pairs file is <run name>-pairs.jsonl)
        task_files = {name: str(task_dir / task_file_name(name, pipe.name)) for name in provided}
        for stage, row in STAGES.items():
            for key, name in row.task_files.items():
                if name not in task_files:
                    continue  # a user's task need not supply every file
                if row.task_files_are_defaults:
                    stage_data[stage].setdefault(key, task_files[name])
                elif key in stage_data[stage] and unimported:
                    continue  # whether the task supplies it is known only once its code runs
                elif key in stage_data[stage]:
                    raise ConfigError(
                        f"{stage}.{key}: the task ({task.name}) supplies it, so the recipe must not; remove "
                        f"{stage}.{key} to train on the task's data, or disable the task (task.enabled: false, no "
                        f"task.module) to use your own")
                else:
                    stage_data[stage][key] = task_files[name]
    # The pipeline wires stage outputs into the next stages.
    for stage, row in STAGES.items():
        for key, source in {**row.wired, **row.wired_if_run}.items():
            if key in stage_data[stage]:
                raise ConfigError(f"{stage}.{key}: set by the pipeline from the earlier stages; remove it from the recipe")
            src_stage = source.split("/")[0]
            if key in row.wired or (stage in stages and src_stage in stages[: stages.index(stage)]):
                stage_data[stage][key] = str(run_dir / source)
    from rlhf.reward_sources import parse_reward_sources

    try:
        ppo_rm = any(src.kind == "rm" for src in parse_reward_sources(stage_data["ppo"].get("rewards", [])))
    except ConfigError as e:
        raise ConfigError(f"ppo: {e}") from None
    if not ppo_rm:  # only fn/http rewards: no reward model is loaded, none is needed before PPO
        stage_data["ppo"].pop("reward_adapter", None)
    elif "ppo" in stages and "reward" not in stages[: stages.index("ppo")]:
        raise ConfigError(f"stages: ppo scores with the reward model (ppo.rewards has {{rm: reward}}, the default), "
                          f"so reward must be listed before ppo (got {list(stages)}); with only fn/http rewards "
                          "and a critic-free estimator, [sft, ppo] needs no reward stage")
    configs = {}
    for stage, row in STAGES.items():  # in table order: a stage inherits only from the rows above it
        for key, source in row.inherits.items():
            src_stage, src_key = source.split(".")
            stage_data[stage].setdefault(key, getattr(configs[src_stage], src_key))
        configs[stage] = from_dict(row.config, stage_data[stage], prefix=stage)

    for stage in stages:
        row, cfg = STAGES[stage], configs[stage]
        if row.check is not None:
            row.check(cfg)
        for key, spec in row.inputs.items():
            if spec.kind == "adapter":
                continue  # wired by the pipeline, or checked when the stage resolves it
            value, name = getattr(cfg, key), f"{stage}.{key}"
            if not value:
                if spec.required:
                    raise ConfigError(f"{name}: required (or a task that supplies it: task.enabled or task.module)")
                continue
            if (task_files is None or value not in task_files.values()) and check_inputs:
                check_input(name, value)
    from rlhf.tracking import normalize_report_to

    for stage, cfg in configs.items():
        try:
            normalize_report_to(cfg.report_to)
        except ValueError as e:
            raise ConfigError(f"{stage}.report_to: {e}") from None
    return Plan(recipe, run_dir, pipe, configs, task_files, stages, task)


def _check_stages(stages: list[str]) -> tuple[str, ...]:
    """The recipe's stage list: known names, each once, each after the stages it consumes."""
    for i, s in enumerate(stages):
        if s not in STAGES:
            raise ConfigError(f"stages[{i}]: unknown stage {s!r} (stages: {', '.join(STAGES)})")
        if s in stages[:i]:
            raise ConfigError(f"stages[{i}]: {s!r} is listed twice")
        missing = [r for r in STAGES[s].requires if r not in stages[:i]]
        if missing:
            raise ConfigError(f"stages[{i}]: {s!r} needs {', '.join(missing)} listed before it (got {stages})")
    if not stages:
        raise ConfigError("stages: empty; list at least sft")
    return tuple(stages)


def _without_paths(cfg: dict, row) -> dict:
    """Config used for fingerprints: the output dir and wiring paths are implied by the run dir."""
    implied = {"output_dir", *row.wired, *row.wired_if_run}
    return {k: v for k, v in cfg.items() if k not in implied}


class Pipeline:
    """Executes a Plan stage by stage, recording state in ``pipeline.json``."""

    def __init__(self, p: Plan):
        if p.pipeline.task.module and p.task_obj is None:
            raise ValueError("a plan made with import_task=False validates a recipe; it cannot run")
        self.p = p
        self.state_path = p.run_dir / "pipeline.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.state.setdefault("name", p.pipeline.name)
        self.state.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.state["recipe"] = str(p.recipe)
        self.state["planned_stages"] = list(p.stages)  # in pipeline order: the dashboard lists those to come
        self.state.setdefault("stages", {})
        self.state["registry_home"] = str(_registry_home(p.pipeline.registry_home))

    def save(self) -> None:
        from rlhf import distributed as dist

        if dist.is_main():  # under accelerate launch every process keeps the state, rank 0 writes it
            write_json(self.state_path, self.state)

    def fingerprints(self) -> dict[str, str]:
        """Each stage's fingerprint: its config (less implied paths), its data inputs' contents,
        and the fingerprints of the stages whose outputs it reads (None for a wired_if_run
        stage that does not run before it)."""
        fps: dict[str, str] = {}
        for stage, row in STAGES.items():
            cfg = self.p.configs[stage]
            data = [_file_hash(getattr(cfg, key)) if getattr(cfg, key) else None
                    for key, spec in row.inputs.items() if spec.kind != "adapter"]
            deps = [fps.get(s) for s in row.requires]
            deps += [fps.get(source.split("/")[0]) if getattr(cfg, key) else None
                     for key, source in row.wired_if_run.items()]
            data += [_file_hash(e["fn"].rpartition(":")[0]) for e in getattr(cfg, "rewards", ())
                     if ".py:" in str(e.get("fn", ""))]  # an edited reward function reruns PPO
            fps[stage] = _fingerprint([_without_paths(to_dict(cfg), row), *data, *deps])
        return fps

    def run(self, from_stage: str | None = None, resume: bool = False) -> dict:
        """Run the stages not cached, holding the run directory's lock throughout.

        Raises:
            RunDirLocked: another process is running in the same run directory.
        """
        from rlhf.runs import locked

        if from_stage is not None and from_stage not in self.p.stages:
            raise ConfigError(f"--from: {from_stage!r} is not a stage of this recipe "
                              f"(stages: {', '.join(self.p.stages)})")
        with locked(self.p.run_dir):
            # every stage (rlhf.stages.make_reproducible) and every launched rank reads it
            os.environ["RLHF_NUM_THREADS"] = str(self.p.pipeline.num_threads)
            return self._run(from_stage, resume)

    def _mark_dead_stages(self, registry) -> None:
        """Stages still "running" under our lock belong to a process that is gone: mark them
        killed here and in the registry (whose reap_runs catches this host's other dead runs)."""
        from rlhf.runs import KILLED_REASON

        for stage, st in self.state["stages"].items():
            if st.get("status") == "running":
                st.update(status="killed", reason=KILLED_REASON)
                print(f"[pipeline] {stage}: the attempt started {st.get('started', '?')} never finished; marked killed")
                if registry is not None and st.get("run"):
                    from rlhf.registry import RegistryError

                    try:
                        registry.mark_run(st["run"], "killed", KILLED_REASON)
                    except RegistryError:
                        pass  # already marked (by reap_runs) or finished
        if registry is not None:
            registry.reap_runs()
        self.save()

    def _run(self, from_stage: str | None, resume: bool) -> dict:
        from rlhf import distributed as dist
        from rlhf.tracking import Tracker  # noqa: F401  (fail early if tracking is broken)

        p = self.p
        # every process reads pipeline.json now that rank 0 holds the lock, before rank 0 writes it
        if self.state_path.exists():
            on_disk = json.loads(self.state_path.read_text())
            self.state.update({k: on_disk[k] for k in ("stages", "base_ref", "task_fingerprint") if k in on_disk})
        dist.barrier()
        p.run_dir.mkdir(parents=True, exist_ok=True)
        # only rank 0 registers runs and artifacts
        registry = _open_registry(p.pipeline) if p.pipeline.register and dist.is_main() else None
        if dist.is_main():
            self._mark_dead_stages(registry)
        task = p.task()
        if task is not None:
            from rlhf.tasks import write_task_files

            want = _fingerprint(to_dict(p.pipeline.task))
            with dist.main_first():  # rank 0 writes the task files, the others then read them
                # a user's task is rewritten every run (its code may have changed); the stage
                # fingerprints hash the files, so unchanged rows still skip the stages
                if dist.is_main() and (self.state.get("task_fingerprint") != want or p.pipeline.task.module
                                       or not all(Path(f).exists() for f in p.task_files.values())):
                    write_task_files(task, p.run_dir / "task", p.pipeline.name)
            self.state["task_fingerprint"] = want
        fps = self.fingerprints()
        forced = p.stages[p.stages.index(from_stage):] if from_stage else ()

        for stage in p.stages:
            st = self.state["stages"].get(stage, {})
            cached = (st.get("status") == "completed" and st.get("fingerprint") == fps[stage]
                      and stage not in forced and all(Path(v).exists() for v in st.get("dirs", {}).values()))
            if STAGES[stage].gated:
                self._check_reward_gate(stage)
            if cached:
                if dist.is_main():
                    print(f"[pipeline] {stage}: unchanged since its last run, skipped")
                continue
            # the stage refuses a checkpoint written under another fingerprint (rlhf.runs.prepare_checkpoints)
            stage_resume = resume and st.get("status") in _RESUMABLE
            run_ref = (registry.start_run(stage, to_dict(p.configs[stage]), inputs=[], pipeline=p.pipeline.name,
                                          name=f"{_safe_name(p.pipeline.name)}-{stage}-run") if registry else None)
            self.state["stages"][stage] = {"status": "running", "fingerprint": fps[stage], "run": run_ref,
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.save()
            self._write_summary(task, final=False)
            if dist.is_main():
                print(f"[pipeline] {stage}: {'resuming' if stage_resume else 'running'}")
            registration = (Registration(registry, _safe_name(p.pipeline.name), run_ref, self._known_artifacts(),
                                         base=self.state.get("base_ref")) if registry else None)
            try:
                result = run_stage(stage, p.configs[stage], group=p.pipeline.name, resume=stage_resume, task=task,
                                   registration=registration, fingerprint=fps[stage])
            except BaseException as e:
                # Ctrl-C is an interruption; anything else (an error, SystemExit) a failure
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                reason = f"{type(e).__name__}: {e}".strip().rstrip(":")
                self.state["stages"][stage].update(status=status, reason=reason,
                                                   ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
                self.save()
                self._write_summary(task, final=False)
                if registry and run_ref:
                    try:
                        registry.mark_run(run_ref, status, reason)
                    except Exception as mark_error:  # noqa: BLE001 - never hide the stage's own error
                        print(f"[pipeline] could not mark {run_ref} {status}: {mark_error}", file=sys.stderr)
                raise
            outputs = registration.outputs if registration else {}
            inputs = registration.inputs if registration else {}
            if registration and registration.base:
                self.state["base_ref"] = registration.base
            if registry and run_ref:
                registry.finish_run(run_ref, "completed", _numbers(result.metrics), outputs=list(outputs.values()))
                from rlhf.tracking import normalize_report_to
                from rlhf.tracking.mlflow import register_adapters

                if "mlflow" in normalize_report_to(p.configs[stage].report_to):  # for teams on MLflow: its registry too
                    register_adapters(p.run_dir, p.pipeline.name, stage, {
                        name: (path, registry.resolve(outputs[name])) for name, path in result.artifacts.items()
                        if name in outputs})
            self.state["stages"][stage].update(
                status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), metrics=_numbers(result.metrics),
                dirs=dict(result.artifacts), outputs=outputs, inputs=inputs, run=run_ref,
            )
            self.save()
        return self._write_summary(task, final=True)

    def _write_summary(self, task: Task | None, final: bool) -> dict:
        """Write ``summary.json`` (rank 0) and return it. Before the last stage has completed
        (a stage starting, interrupted or failed) its numbers are the run's so far: marked
        ``provisional``, with the stages still to come; the gold evaluation of the reward model
        waits for the final one (it must not run between two stages)."""
        from rlhf import distributed as dist

        out = self.summary(task, evaluate=final)
        if dist.is_main():
            write_json(self.p.run_dir / "summary.json", out)
        return out

    def _known_artifacts(self) -> dict[str, tuple[str, str]]:
        """Registered artifacts of the completed stages: directory -> (stage, registry ref)."""
        known = {}
        for stage, st in self.state["stages"].items():
            if st.get("status") != "completed":
                continue
            for name, path in st.get("dirs", {}).items():
                if name in st.get("outputs", {}):
                    known[str(Path(path).resolve())] = (stage, st["outputs"][name])
        return known

    def _check_reward_gate(self, stage: str) -> None:
        """Stop before ``stage`` (a gated row: PPO) when the reward model wired into it fails the
        recipe's ``reward_gate``: fewer than ``min_pairs`` held-out pairs scored, the accuracy's
        lower confidence bound (:func:`rlhf.summary.accuracy_lower_bound`) below
        ``min_accuracy``, or a mean margin below ``min_margin`` (the summary is written first).
        The accuracy is the reward stage's own, on every held-out pair (``heldout_*``)."""
        gate = self.p.pipeline.reward_gate
        row = STAGES[stage]
        if not gate.enabled or not getattr(self.p.configs[stage], "reward_adapter", ""):  # no reward model: no gate
            return
        rm = {**row.wired, **row.wired_if_run}["reward_adapter"].split("/")[0]  # the stage that trained the reward model
        m = self.state["stages"].get(rm, {}).get("metrics", {})
        n, correct, margin = m.get("heldout_pairs"), m.get("heldout_correct"), m.get("heldout_margin")
        problems = []
        if not n:
            problems.append(f"no held-out accuracy (no test pairs scored; a run before the gate scored every pair "
                            f"needs `--from {rm}`)")
        else:
            bound = summary.accuracy_lower_bound(correct, n, gate.confidence)
            said = (f"held-out accuracy {correct / n:.3f} ({correct} of {n} pairs), "
                    f"{gate.confidence:.0%} lower bound {bound:.3f}")
            if bound < gate.min_accuracy:
                problems.append(f"{said} < reward_gate.min_accuracy {gate.min_accuracy}")
            if n < gate.min_pairs:
                problems.append(f"{n} held-out pairs < reward_gate.min_pairs {gate.min_pairs}"
                                + ("" if problems else f" ({said})"))
        if margin is not None and margin < gate.min_margin:
            problems.append(f"held-out margin {margin:.3f} < reward_gate.min_margin {gate.min_margin}")
        from rlhf import distributed as dist

        if not problems:
            if dist.is_main():
                print(f"[pipeline] reward gate passed: {said} >= reward_gate.min_accuracy {gate.min_accuracy}, "
                      f"{n} pairs >= reward_gate.min_pairs {gate.min_pairs}", flush=True)
            return
        self.state["stages"][stage] = {"status": "blocked", "reason": "; ".join(problems)}
        self.save()
        self._write_summary(self.p.task(), final=True)
        name = stage.upper()
        raise RewardGateFailed(
            f"reward model failed the quality gate ({'; '.join(problems)}); "
            f"{name} was not run, since optimising a reward model near chance makes the policy worse. Try: more or "
            f"cleaner preference pairs (are chosen and rejected swapped?), more {rm}.train.num_train_epochs or another "
            f"{rm}.train.learning_rate, a larger {rm}.lora.r, a larger {rm}.eval_fraction for a steadier "
            f"estimate; or lower reward_gate.min_accuracy or reward_gate.confidence / set reward_gate.enabled: false to "
            f"run {name} anyway. "
            f"Rerun with `--from {rm}` (run dir {self.p.run_dir}).")

    def summary(self, task: Task | None, evaluate: bool = True) -> dict:
        """Numbers of the run (and, with a task and ``evaluate``, its gold evaluation);
        ``provisional`` until every stage of the recipe has completed, ``stages_to_come``
        those that have not, in pipeline order."""
        st = self.state["stages"]
        sft_m, rm_m, ppo_m = (st.get(s, {}).get("metrics", {}) for s in ("sft", "reward", "ppo"))
        out = {
            "sft_loss": sft_m.get("loss"),
            "sft_eval_loss": sft_m.get("eval_loss"),
            # the reward model on every held-out pair (none filtered; too long ones shortened and counted)
            "rm_accuracy": rm_m.get("heldout_accuracy"),
            "rm_accuracy_lower": (summary.accuracy_lower_bound(rm_m["heldout_correct"], rm_m["heldout_pairs"],
                                                               self.p.pipeline.reward_gate.confidence)
                                  if rm_m.get("heldout_pairs") else None),
            "rm_accuracy_confidence": self.p.pipeline.reward_gate.confidence if rm_m.get("heldout_pairs") else None,
            "rm_margin": rm_m.get("heldout_margin"),
            "rm_heldout_pairs": rm_m.get("heldout_pairs"),
            "rm_heldout_truncated": rm_m.get("heldout_truncated"),
            # pairs longer than reward.train.max_length, which TRL leaves out (train / held out)
            "rm_train_pairs_too_long": rm_m.get("train_pairs_too_long"),
            "rm_test_pairs_too_long": rm_m.get("test_pairs_too_long"),
            "reward_score_sft": ppo_m.get(summary.key(summary.REFERENCE, "score")),
            "reward_score_sft_se": ppo_m.get(summary.key(summary.REFERENCE, "score", "se")),
            "reward_score_ppo": ppo_m.get(summary.key(summary.TRAINED, "score")),
            "reward_score_ppo_se": ppo_m.get(summary.key(summary.TRAINED, "score", "se")),
            "kl_sft": ppo_m.get(summary.key(summary.REFERENCE, "kl")),
            "kl_ppo_sft": ppo_m.get(summary.key(summary.TRAINED, "kl")),
            "kl_ppo_sft_se": ppo_m.get(summary.key(summary.TRAINED, "kl", "se")),
            "response_length_sft": ppo_m.get(summary.key(summary.REFERENCE, "length")),
            "response_length_sft_se": ppo_m.get(summary.key(summary.REFERENCE, "length", "se")),
            "response_length_ppo": ppo_m.get(summary.key(summary.TRAINED, "length")),
            "response_length_ppo_se": ppo_m.get(summary.key(summary.TRAINED, "length", "se")),
            "win_rate_rm": ppo_m.get(summary.key(summary.TRAINED, "win_rate")),
            "win_rate_rm_se": ppo_m.get(summary.key(summary.TRAINED, "win_rate", "se")),
            "eval_prompts": ppo_m.get("final/eval/prompts"),
        }
        # a reward-model ensemble (reward.ensemble > 1): each member's and the ensemble's held-out accuracy
        out.update({f"rm_{k}": v for k, v in rm_m.items() if k in ("ensemble_accuracy", "ensemble_members")
                    or (k.startswith("member") and k.endswith("_accuracy") and k.count("_") == 1)})
        # what the over-optimisation watchdog saw and did (rlhf/watchdog.py)
        out.update({k.replace("final/", "").replace("/", "_"): v for k, v in ppo_m.items()
                    if k.startswith("watchdog/")})
        out.update(_judge_summary(ppo_m, self.p.configs["ppo"].watchdog_judge, out.get("kl_ppo_sft")))
        if st.get("ppo", {}).get("status") == "blocked":
            out["ppo_blocked"] = st["ppo"].get("reason")
        if task is not None:
            out["task"] = getattr(task, "name", None)
            out["win_rate_gold"] = ppo_m.get(summary.key(summary.TRAINED, "gold_win_rate"))
            out["win_rate_gold_se"] = ppo_m.get(summary.key(summary.TRAINED, "gold_win_rate", "se"))
            out.update(
                gold_reward_sft=ppo_m.get(summary.key(summary.REFERENCE, "gold")),
                gold_reward_sft_se=ppo_m.get(summary.key(summary.REFERENCE, "gold", "se")),
                gold_reward_ppo=ppo_m.get(summary.key(summary.TRAINED, "gold")),
                gold_reward_ppo_se=ppo_m.get(summary.key(summary.TRAINED, "gold", "se")),
            )
            out["rm_accuracy_gold"] = st.get("reward", {}).get("metrics", {}).get("gold_accuracy")
            from rlhf import distributed as dist

            if (evaluate and out.get("rm_accuracy_gold") is None and "reward" in st
                    and st["reward"].get("status") == "completed"
                    and callable(getattr(task, "response_pairs", None)) and dist.is_main()):  # an evaluation for the summary, which rank 0 writes
                from rlhf.resolve import resolve_base
                from rlhf.tasks import gold_rm_accuracy

                model = self.p.pipeline.model
                acc = gold_rm_accuracy(task, resolve_base(model.name_or_path, seed=self.p.pipeline.seed), model.dtype,
                                       st["reward"]["dirs"]["adapter"], chat_template=model.chat_template)
                st["reward"].setdefault("metrics", {})["gold_accuracy"] = acc
                self.save()
                out["rm_accuracy_gold"] = acc
            if None not in (out["gold_reward_sft"], out["gold_reward_ppo"]):
                diff = out["gold_reward_ppo"] - out["gold_reward_sft"]
                se = math.hypot(out["gold_reward_sft_se"], out["gold_reward_ppo_se"])
                out["gold_improvement"] = diff
                out["gold_improvement_in_se"] = diff / se if se > 0 else None
                out["kl_per_gold_gain"] = _per_gain(out.get("kl_ppo_sft"), diff)
        for name in ("dpo", "kto"):
            if name in self.p.stages and st.get(name, {}).get("status") == "completed":
                _add_offline_summary(out, name, st[name].get("metrics", {}), task is not None)
        out["stages_to_come"] = [s for s in self.p.stages if st.get(s, {}).get("status") != "completed"]
        out["provisional"] = bool(out["stages_to_come"])
        return out


def _per_gain(kl: float | None, gain: float | None) -> float | None:
    """KL spent per unit of gain; None when either is missing or the gain is not positive
    (no KL buys a loss)."""
    return kl / gain if kl is not None and gain is not None and gain > 0 else None


def _judge_summary(m: dict, watchdog_judge: str, kl: float | None) -> dict:
    """The watchdog's judge of the SFT and the published policy (``judge_sft``, ``judge_ppo``,
    on the evaluations' first ``eval_max_prompts`` prompts or the held-out pairs), which judge it
    was (``judge``: objective, function or pairs), its gain and ``kl_per_judge_gain``: the KL to
    SFT per response spent per unit of judge gain. {} when the run had no judge."""
    sft, ppo = m.get(f"{summary.REFERENCE}watchdog/judge"), m.get(f"{summary.TRAINED}watchdog/judge")
    if sft is None or ppo is None:
        return {}
    kind = ("pairs" if f"{summary.REFERENCE}judge/pairs_agreement" in m
            else "function" if watchdog_judge else "objective")
    return {"judge": kind, "judge_sft": sft, "judge_ppo": ppo, "judge_gain": ppo - sft,
            "kl_per_judge_gain": _per_gain(kl, ppo - sft)}


def _add_offline_summary(out: dict, n: str, m: dict, has_gold: bool) -> None:
    """DPO's or KTO's numbers (stage ``n``) next to PPO's, under the same keys with ``n`` in
    place of ``ppo`` (``gold_reward_dpo``, ``win_rate_kto_sft``...). The stage sampled the SFT
    and its policy on the same held-out prompts as PPO's evaluation, with PPO's sampler,
    settings and seed, and reports them by the same convention (:mod:`rlhf.summary`); without
    a PPO stage its SFT numbers stand in for the SFT row."""
    ref, trained = summary.REFERENCE, summary.TRAINED
    out.update({
        f"{n}_eval_loss": m.get("eval_loss"),
        # pairs longer than train.max_length, which TRL truncates (train / held out)
        f"{n}_train_pairs_too_long": m.get("train_pairs_too_long"),
        f"{n}_test_pairs_too_long": m.get("test_pairs_too_long"),
        f"{n}_reward_accuracy": m.get("eval_rewards_accuracies"),
        f"{n}_reward_margin": m.get("eval_rewards_margins"),
        f"reward_score_{n}": m.get(summary.key(trained, "score")),
        f"kl_{n}_sft": m.get(summary.key(trained, "kl")),
        f"kl_{n}_sft_se": m.get(summary.key(trained, "kl", "se")),
        f"response_length_{n}": m.get(summary.key(trained, "length")),
        f"win_rate_{n}_sft": m.get(summary.key(trained, "win_rate")),
        f"win_rate_{n}_sft_se": m.get(summary.key(trained, "win_rate", "se")),
    })
    if out.get("reward_score_sft") is None:
        out["reward_score_sft"] = m.get(summary.key(ref, "score"))
    if not has_gold:
        return
    out.update({f"gold_reward_{n}": m.get(summary.key(trained, "gold")),
                f"gold_reward_{n}_se": m.get(summary.key(trained, "gold", "se")),
                f"gold_win_rate_{n}_sft": m.get(summary.key(trained, "gold_win_rate")),
                f"gold_win_rate_{n}_sft_se": m.get(summary.key(trained, "gold_win_rate", "se"))})
    sft, sft_se = m.get(summary.key(ref, "gold")), m.get(summary.key(ref, "gold", "se"))
    if out.get("gold_reward_sft") is None:
        out.update(gold_reward_sft=sft, gold_reward_sft_se=sft_se)
    if None not in (sft, out[f"gold_reward_{n}"]):
        diff = out[f"gold_reward_{n}"] - sft
        se = math.hypot(sft_se, out[f"gold_reward_{n}_se"])
        out[f"gold_improvement_{n}"] = diff
        out[f"gold_improvement_{n}_in_se"] = diff / se if se > 0 else None


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _registry_home(home):
    from rlhf.paths import rlhf_home

    return rlhf_home(home)


def _open_registry(cfg):
    from rlhf.registry import Registry

    return Registry.open(home=cfg.registry_home, url=cfg.registry_url, store_dir=cfg.registry_store)


_RESUMABLE = ("running", "failed", "killed", "interrupted")


def print_summary(summary: dict, run_dir: Path, file=None) -> None:
    """Print what the run achieved, the artifacts it produced (registry refs and directories,
    from ``pipeline.json``) and the commands a user runs next."""
    from rich.console import Console
    from rich.table import Table

    def fmt(key: str, se_key: str | None = None) -> str:
        v = summary.get(key)
        if v is None:
            return "-"
        if se_key and summary.get(se_key) is not None:
            return f"{v:.4f} ± {summary[se_key]:.4f}"
        return f"{v:.4f}"

    console = Console(file=file, soft_wrap=True)
    table = Table(title=f"rlhf run: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("SFT loss (train, last logged)", fmt("sft_loss")),
        ("SFT eval loss", fmt("sft_eval_loss")),
        ("RM held-out accuracy (noisy labels)", fmt("rm_accuracy")),
        (f"RM accuracy, {summary.get('rm_accuracy_confidence') or 0.95:.0%} lower bound, on n held-out pairs",
         f"{fmt('rm_accuracy_lower')}, n = {summary.get('rm_heldout_pairs') or '-'}"),
        ("RM accuracy vs noiseless gold", fmt("rm_accuracy_gold")),
        ("gold reward, SFT policy (± s.e.)", fmt("gold_reward_sft", "gold_reward_sft_se")),
        ("gold reward, PPO policy (± s.e.)", fmt("gold_reward_ppo", "gold_reward_ppo_se")),
        ("gold improvement (in s.e. of the difference)", fmt("gold_improvement_in_se")),
        ("RM score, SFT -> PPO", f"{fmt('reward_score_sft')} -> {fmt('reward_score_ppo')}"),
        ("win rate PPO over SFT, by the RM (± s.e.)", fmt("win_rate_rm", "win_rate_rm_se")),
        ("win rate PPO over SFT, by the objective (± s.e.)", fmt("win_rate_gold", "win_rate_gold_se")),
        ("KL(PPO || SFT) per response (± s.e.)", fmt("kl_ppo_sft", "kl_ppo_sft_se")),
        (f"watchdog judge ({summary.get('judge')}), SFT -> PPO",
         f"{fmt('judge_sft')} -> {fmt('judge_ppo')}" if summary.get("judge") else "-"),
        ("KL per unit of judge gain", fmt("kl_per_judge_gain")),
        ("KL per unit of gold gain", fmt("kl_per_gold_gain")),
        ("watchdog tripped", "yes" if summary.get("watchdog_tripped") else "-"),
        ("response length, SFT -> PPO", f"{fmt('response_length_sft')} -> {fmt('response_length_ppo')}"),
        ("PPO not run", summary.get("ppo_blocked") or "-"),
        ("gold reward, DPO policy (± s.e.)", fmt("gold_reward_dpo", "gold_reward_dpo_se")),
        ("DPO gold improvement (in s.e. of the difference)", fmt("gold_improvement_dpo_in_se")),
        ("RM score, DPO policy", fmt("reward_score_dpo")),
        ("DPO win rate over SFT, by RM (± s.e.)", fmt("win_rate_dpo_sft", "win_rate_dpo_sft_se")),
        ("DPO win rate over SFT, by gold (± s.e.)", fmt("gold_win_rate_dpo_sft", "gold_win_rate_dpo_sft_se")),
        ("KL(DPO || SFT) per response (± s.e.)", fmt("kl_dpo_sft", "kl_dpo_sft_se")),
        ("gold reward, KTO policy (± s.e.)", fmt("gold_reward_kto", "gold_reward_kto_se")),
        ("KTO gold improvement (in s.e. of the difference)", fmt("gold_improvement_kto_in_se")),
        ("RM score, KTO policy", fmt("reward_score_kto")),
        ("KTO win rate over SFT, by RM (± s.e.)", fmt("win_rate_kto_sft", "win_rate_kto_sft_se")),
        ("KTO win rate over SFT, by gold (± s.e.)", fmt("gold_win_rate_kto_sft", "gold_win_rate_kto_sft_se")),
        ("KL(KTO || SFT) per response (± s.e.)", fmt("kl_kto_sft", "kl_kto_sft_se")),
    ]
    for k, v in rows:
        if v not in ("-", "- -> -"):
            table.add_row(k, v)
    console.print(table)

    state_path = Path(run_dir) / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    stages = state.get("stages", {})
    artifacts = Table(title="artifacts")
    for column in ("stage", "artifact", "registry ref", "directory"):
        artifacts.add_column(column)
    for stage in (s for s in STAGES if s in stages):  # pipeline.json keeps its keys sorted
        st = stages[stage]
        outputs, dirs = st.get("outputs", {}), st.get("dirs", {})
        for name in sorted(set(outputs) | set(dirs), key=lambda n: (n not in dirs, n)):
            artifacts.add_row(stage, name, outputs.get(name, "-"), dirs.get(name, "-"))
        if st.get("run"):
            artifacts.add_row(stage, "run", st["run"], "")
    if artifacts.rows:
        console.print(artifacts)

    home = state.get("registry_home")
    q = shlex.quote
    home_opt = f" --home {q(home)}" if home and Path(home) != _registry_home(None) else ""
    policy = stages.get("ppo", {}).get("outputs", {}).get("policy")
    reward = stages.get("reward", {}).get("outputs", {}).get("adapter")
    report = Path(run_dir) / "report.html"
    lines = [f"summary written to {Path(run_dir) / 'summary.json'}", "next:"]
    if policy:
        export_dir = Path("exports") / policy.replace(":", "-")
        lines += [f"  rlhf registry export {policy} {q(str(export_dir))}{home_opt}    # the policy as a standalone HF model",
                  f"  rlhf generate {policy} --prompt 'Hello'{home_opt}    # sample from the trained policy"]
    elif "policy" in stages.get("ppo", {}).get("dirs", {}):
        lines.append("  (register: false, so nothing is in the registry to export or generate from)")
    for name in ("dpo", "kto"):
        offline_policy = stages.get(name, {}).get("outputs", {}).get("adapter")
        if offline_policy:
            export_dir = Path("exports") / offline_policy.replace(":", "-")
            lines += [f"  rlhf registry export {offline_policy} {q(str(export_dir))}{home_opt}    # the {name.upper()} "
                      "policy as a standalone HF model",
                      f"  rlhf generate {offline_policy} --prompt 'Hello'{home_opt}    # sample from the {name.upper()} policy"]
    if reward:
        lines.append(f"  rlhf registry export {reward} {q(str(Path('exports') / reward.replace(':', '-')))}{home_opt}"
                     "    # the reward model as a sequence classifier")
    lines += [f"  rlhf report {q(str(run_dir))} --out {q(str(report))}    # a self-contained HTML report",
              f"  rlhf dashboard --runs-root {q(str(Path(run_dir).parent))}    # browse this and other runs"]
    console.print("\n".join(lines), markup=False, highlight=False)
