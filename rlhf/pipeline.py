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


def _code_ref(value, base: Path):
    """A ``file.py:name`` code reference with its file resolved against ``base``; any other
    value (``pkg.mod:name``, a built-in name) as it is."""
    if not isinstance(value, str) or ".py:" not in value:
        return value
    path, _, attr = value.rpartition(":")
    return f"{_recipe_relative(path, base)}:{attr}"


def _code_slots(section: dict, spec: str):
    """``(mapping, key)`` of each place ``spec`` of a row's ``code_refs`` names in ``section``:
    ``key`` itself, or ``list.key``, the key of each entry of a list."""
    outer, _, inner = spec.rpartition(".")
    holders = [section] if not outer else [e for e in (section.get(outer) or []) if isinstance(e, dict)]
    return [(h, inner) for h in holders if inner in h]


def _resolve_recipe_paths(data: dict, base: Path) -> dict:
    for section, key in _path_keys():
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = _recipe_relative(node[key], base)
    task = data.get("task")
    if isinstance(task, dict) and "module" in task:
        task["module"] = _code_ref(task["module"], base)
    for stage, row in STAGES.items():
        if isinstance(data.get(stage), dict):
            for spec in row.code_refs:
                for holder, key in _code_slots(data[stage], spec):
                    holder[key] = _code_ref(holder[key], base)
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
    for stage, row in STAGES.items():
        if row.prepare is not None:
            row.prepare(stage_data[stage], stages)
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
        raise ConfigError(f"stages: empty; list at least {', '.join(s for s, row in STAGES.items() if not row.requires)}")
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
            config = to_dict(cfg)
            data += [_file_hash(holder[key].rpartition(":")[0]) for spec, hashed in row.code_refs.items() if hashed
                     for holder, key in _code_slots(config, spec) if ".py:" in str(holder[key])]
            # a data input counts by ``data`` alone (a file's bytes, else ``ref:<value>``), not by
            # its path: a run directory copied or moved elsewhere keeps its fingerprints
            config = {k: v for k, v in _without_paths(config, row).items()
                      if k not in row.inputs or row.inputs[k].kind == "adapter"}
            fps[stage] = _fingerprint([config, *data, *deps])
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
        """Numbers of the run (and, with a task and ``evaluate``, its gold evaluation): each
        stage's contribution (``Stage.summary`` of the stage table, :mod:`rlhf.summary`), in
        table order; ``provisional`` until every stage of the recipe has completed (or was
        blocked by the reward gate, which ends the run), ``stages_to_come`` those that have
        not, in pipeline order."""
        from rlhf import distributed as dist

        st = self.state["stages"]
        if task is not None and evaluate and dist.is_main():  # an evaluation for the summary, which rank 0 writes
            self._measure_task_metrics(task)
        out: dict = {}
        for stage, row in STAGES.items():
            if row.summary is not None:
                row.summary.add(out, st.get(stage, {}), stage in self.p.stages, task is not None,
                                self.p.configs.get(stage))
            if st.get(stage, {}).get("status") == "blocked":
                out[f"{stage}_blocked"] = st[stage].get("reason")
        summary.with_accuracy_bound(out, self.p.pipeline.reward_gate.confidence)
        if task is not None:
            out["task"] = getattr(task, "name", None)
        # a stage the reward gate blocked is not to come: the run ended there (``<stage>_blocked``)
        out["stages_to_come"] = [s for s in self.p.stages if st.get(s, {}).get("status") not in ("completed", "blocked")]
        out["provisional"] = bool(out["stages_to_come"])
        return out

    def _measure_task_metrics(self, task: Task) -> None:
        """Measure each completed stage's ``task_metric`` that its metrics lack (kept in
        ``pipeline.json``, so a rerun does not measure it again)."""
        for stage, row in STAGES.items():
            st = self.state["stages"].get(stage, {})
            if row.task_metric is None or st.get("status") != "completed":
                continue
            name, measure = row.task_metric
            if st.get("metrics", {}).get(name) is None:
                value = measure(task, self.p.pipeline, st.get("dirs", {}))
                if value is not None:
                    st.setdefault("metrics", {})[name] = value
                    self.save()


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

    from rlhf.summary import line_value

    console = Console(file=file, soft_wrap=True)
    table = Table(title=f"rlhf run: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for stage, row in STAGES.items():
        for line in row.summary.lines if row.summary is not None else ():
            value = line_value(line, summary)
            if value not in ("-", "- -> -"):
                table.add_row(line.label, value)
        if summary.get(f"{stage}_blocked"):  # stopped by the reward gate
            table.add_row(f"{stage.upper()} not run", summary[f"{stage}_blocked"])
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
    report = Path(run_dir) / "report.html"
    lines = [f"summary written to {Path(run_dir) / 'summary.json'}", "next:"]
    unregistered = False
    # the policies first (export and sample), then the other artifacts (export)
    exports = [(stage, export) for stage, row in STAGES.items() for export in row.exports]
    for stage, export in sorted(exports, key=lambda e: e[1].sample is None):
        st = stages.get(stage, {})
        ref = st.get("outputs", {}).get(export.output)
        if ref:
            lines.append(f"  rlhf registry export {ref} {q(str(Path('exports') / ref.replace(':', '-')))}{home_opt}"
                         f"    # {export.what}")
            if export.sample:
                lines.append(f"  rlhf generate {ref} --prompt 'Hello'{home_opt}    # sample from {export.sample}")
        elif export.sample and export.output in st.get("dirs", {}) and not unregistered:
            unregistered = True
            lines.append("  (register: false, so nothing is in the registry to export or generate from)")
    lines += [f"  rlhf report {q(str(run_dir))} --out {q(str(report))}    # a self-contained HTML report",
              f"  rlhf dashboard --runs-root {q(str(Path(run_dir).parent))}    # browse this and other runs"]
    console.print("\n".join(lines), markup=False, highlight=False)
