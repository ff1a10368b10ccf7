"""Experiment tracking: local JSONL files always, wandb / TensorBoard / trackio on request.

Every stage writes its curves and sample completions into the pipeline run directory,
which is what ``rlhf dashboard`` and ``rlhf report`` read::

    <run_dir>/<stage>/metrics.jsonl   {"step": int, "time": float, "<metric>": float, ...} per line
    <run_dir>/<stage>/samples.jsonl   {"step": int, "prompt": str, "completion": str, "score": float, "gold": float|null,
                                       ...any other per-sample number, e.g. "length" (response tokens)}
    <run_dir>/<stage>/log.txt         one text line per logged step and per note(): what --verbose prints
    <run_dir>/<stage>/tracker.json    {"stage", "group", "world_size", "refs", "report_to", "rlhf_version", "started"}

The local files are the source of truth and need no network. Remote trackers are extras that
must never stop a training run: wandb without credentials logs offline (and says how to sync
later), and a wandb start-up failure degrades to offline, then to off, with a warning.
Each tracker is one class in its own module (``local.py``, ``wandb.py``, ``tensorboard.py``,
``trackio.py``) behind the small protocol of ``backend.py``, registered in :data:`BACKENDS`.

Typical use inside a stage::

    tracker = Tracker(run_dir, "ppo", config=resolved, report_to=["local", "wandb"],
                      group=run_name, refs={"base": base_ref, "sft": sft_ref})
    bar = StageProgress("ppo", total_updates, unit="update")  # bar on a TTY, record lines elsewhere
    for update in range(total_updates):
        ...
        tracker.log({"reward/score_mean": 0.3, "kl/mean": 0.01}, step=update + 1)
        bar.update(1, {"score": 0.3, "kl": 0.01})
    bar.close()
    tracker.finish()

A TRL/transformers stage calls ``tracker.attach(trainer)`` instead: the trainer's log dicts
go to the tracker (not the console) and the console shows one progress bar or record line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

import rlhf
from rlhf.tracking.backend import Backend, RunInfo, json_number
from rlhf.tracking.local import LocalFiles, metric_text
from rlhf.tracking.mlflow import MLflowTracker
from rlhf.tracking.tensorboard import TensorBoardTracker
from rlhf.tracking.trackio import TrackioTracker
from rlhf.tracking.wandb import WandbTracker

__all__ = [
    "BACKENDS",
    "REPORT_TO_CHOICES",
    "StageProgress",
    "Tracker",
    "filter_third_party_noise",
    "normalize_report_to",
    "progress",
    "progress_interval",
]

#: The trackers besides the local files, by their ``report_to`` name: one class per backend
#: (see :mod:`rlhf.tracking.backend`). A new tracker is one module and one line here.
BACKENDS: dict[str, type[Backend]] = {
    "wandb": WandbTracker,
    "tensorboard": TensorBoardTracker,
    "trackio": TrackioTracker,
    "mlflow": MLflowTracker,
}

#: Tracker names accepted in a recipe's ``report_to``. "local" is always on.
REPORT_TO_CHOICES = ("local", *BACKENDS)

# Columns of one sample-completion row, in the order tables show them.
SAMPLE_COLUMNS = ("step", "prompt", "completion", "score", "gold")


def progress(
    iterable: Iterable | None = None,
    total: int | float | None = None,
    desc: str | None = None,
    **kwargs: Any,
) -> tqdm:
    """A progress bar with rate and ETA on a terminal, silent when stderr is not a TTY.

    ``disable=None`` is tqdm's "auto" mode: the bar turns itself off when its output stream
    is not a terminal, so CI logs and redirected output stay free of carriage-return noise.

    Args:
        iterable: What to iterate over; leave out and call ``.update(n)`` for manual bars.
        total: Number of expected items (taken from ``len(iterable)`` when possible).
        desc: Short label shown before the bar, e.g. ``"ppo rollouts"``.
        **kwargs: Passed to ``tqdm`` (e.g. ``unit="sample"``, ``leave=False``, ``file=...``);
            they override the defaults here.

    Returns:
        A ``tqdm`` instance usable as an iterator and as a context manager.
    """
    options: dict[str, Any] = {
        "disable": None,
        "dynamic_ncols": True,
        "file": sys.stderr,
        # tqdm's default layout already carries elapsed<remaining (the ETA) and the rate;
        # spelled out here so the contract does not depend on tqdm's defaults.
        "bar_format": "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    }
    if total is None and iterable is not None and not hasattr(iterable, "__len__"):
        # Unknown length: percentage and ETA cannot exist, keep count, elapsed time and rate.
        options["bar_format"] = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
    options.update(kwargs)
    return tqdm(iterable, total=total, desc=desc, **options)


# Warnings raised inside third-party code that our code cannot fix at the source, each
# silenced by its exact message (and category), never by module or category alone: a new
# warning from the same library still shows. Known warnings our own calls cause are fixed
# where we make the call instead.
THIRD_PARTY_NOISE = (
    # peft and TRL read PreTrainedModel.is_gradient_checkpointing, deprecated in transformers 5
    # (trl/models/utils.py, peft/mixed_model.py); nothing we pass changes that.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6"),
)


def filter_third_party_noise() -> None:
    """Silence the warnings of :data:`THIRD_PARTY_NOISE` (by message) for this process."""
    for category, message in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


#: Seconds between progress records when stderr is not a terminal, unless set otherwise.
DEFAULT_PROGRESS_INTERVAL_S = 30.0

#: What a trainer's progress line shows, when logged (TRL's SFT and reward trainers).
TRAINER_PROGRESS_KEYS = ("loss", "eval_loss", "accuracy", "eval_accuracy", "mean_token_accuracy")


def progress_interval(interval_s: float | None = None) -> float:
    """Seconds between non-terminal progress records: the argument, else ``$RLHF_PROGRESS_INTERVAL``,
    else :data:`DEFAULT_PROGRESS_INTERVAL_S`.

    Raises:
        ValueError: if the value is not a positive number (naming where it came from).
    """
    source, value = "interval_s", interval_s
    if value is None and os.environ.get("RLHF_PROGRESS_INTERVAL", "").strip():
        source, value = "RLHF_PROGRESS_INTERVAL", os.environ["RLHF_PROGRESS_INTERVAL"].strip()
    if value is None:
        return DEFAULT_PROGRESS_INTERVAL_S
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{source}: progress interval must be a positive number of seconds, got {value!r}")
    return number


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StageProgress:
    """A stage's progress for whoever watches it: a bar on a terminal, one-line records elsewhere.

    On a terminal this is a tqdm bar (rate, ETA) with the key metrics after it. When the
    stream is not a terminal (a file, a pipe, a batch job's log) tqdm would print nothing;
    instead one line is printed for the first step, then at most every ``interval_s``
    seconds, and once at the end::

        [ppo] update 16/64 (25%) elapsed 0:00:12 eta 0:00:36 score=0.412 kl=0.52

    Args:
        stage: Stage name, printed first.
        total: Number of steps (updates for PPO, optimizer steps for TRL stages).
        unit: What a step is called in the line ("update", "step").
        initial: Steps already done (a resumed stage); the ETA counts only this run's pace.
        interval_s: Seconds between records off a terminal; see :func:`progress_interval`.
        stream: Where to write; stderr by default.
        tty: Force terminal (True) or record (False) mode; by default ``stream.isatty()``.
        enabled: False on non-main processes of a distributed run: nothing is printed.
        clock: Monotonic clock in seconds (tests pass a fake).
    """

    def __init__(
        self,
        stage: str,
        total: int,
        *,
        unit: str = "step",
        initial: int = 0,
        interval_s: float | None = None,
        stream: Any = None,
        tty: bool | None = None,
        enabled: bool = True,
        clock: Any = time.monotonic,
    ) -> None:
        self.stage, self.total, self.unit = stage, int(total), unit
        self.n = self.initial = int(initial)
        self.interval_s = progress_interval(interval_s)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.metrics: dict[str, float] = {}
        self._clock = clock
        self._start = clock()
        self._last_print: float | None = None
        self._printed_n: int | None = None
        self._closed = False
        self._phase: str | None = None
        is_tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled and is_tty:
            self._bar = tqdm(
                total=self.total, initial=self.initial, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            )

    def line(self) -> str:
        """The one-line record of where the stage is now."""
        elapsed = self._clock() - self._start
        done = self.n - self.initial
        eta = _duration(elapsed / done * (self.total - self.n)) if done > 0 and self.total >= self.n else "?"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        text = f"[{self.stage}] {self.unit} {self.n}/{self.total}{percent} elapsed {_duration(elapsed)} eta {eta}"
        text += f" {metric_text(self.metrics)}" if self.metrics else ""
        return text + (f" ({self._phase})" if self._phase else "")

    def phase(self, text: str | None) -> None:
        """Say what the current step is doing (``"update 3: minibatch 5/16"``); ``None`` clears it.

        A step can take minutes (a PPO update on a CPU): the bar's text changes with the
        phase, so it never looks frozen, and off a terminal a record is printed when
        ``interval_s`` has passed since the last one, even though no step has finished.
        """
        if not self.enabled or self._closed:
            return
        self._phase = text
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(x for x in (metric_text(self.metrics), f"({text})" if text else "") if x),
                                      refresh=True)
            return
        now = self._clock()
        last = self._last_print if self._last_print is not None else self._start
        if text and now - last >= self.interval_s:
            self._print(now)

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Replace the key metrics shown (numbers only; others are ignored)."""
        clean = {str(k): v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        self.metrics.update(clean)
        if self._bar is not None:
            self._bar.set_postfix_str(metric_text(self.metrics), refresh=False)

    def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None, *, report: bool = True) -> None:
        """Advance by ``n`` steps (and show ``metrics``).

        Args:
            report: Print a record if one is due (off a terminal). A caller whose metrics for
                this step arrive later passes False and calls :meth:`report_if_due` then.
        """
        if not self.enabled:
            return
        self._phase = None  # the step it described is over
        if metrics:
            self.set_metrics(metrics)
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif report:
            self.report_if_due()

    def update_to(self, n: int, metrics: Mapping[str, Any] | None = None, *, report: bool = True) -> None:
        """Advance to absolute step ``n`` (a trainer's ``global_step``)."""
        self.update(max(0, n - self.n), metrics, report=report)

    def report_if_due(self) -> None:
        """Off a terminal, print a record for the first step, when ``interval_s`` passed since
        the last one, and on reaching ``total``."""
        if not self.enabled or self._bar is not None or self._closed or self.n in (self._printed_n, self.initial):
            return
        now = self._clock()
        if self._last_print is None or now - self._last_print >= self.interval_s or self.n >= self.total:
            self._print(now)

    def _print(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_print, self._printed_n = now, self.n

    def close(self) -> None:
        """Close the bar, or print the final record if the last one is not it. Safe twice."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._printed_n != self.n:
            self._print(self._clock())

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def normalize_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """Validate a ``report_to`` setting and return it as a list that always holds "local".

    Accepts a list, a single name, a comma-separated string, or None / "none" (local only).

    Raises:
        ValueError: if a name is not one of :data:`REPORT_TO_CHOICES`.
    """
    if report_to is None:
        names: list[str] = []
    elif isinstance(report_to, str):
        names = [part.strip() for part in report_to.split(",") if part.strip()]
    else:
        names = [str(part).strip() for part in report_to]
    result = ["local"]
    for name in names:
        if name in ("none", ""):
            continue
        if name != "local" and name not in BACKENDS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; choose from {', '.join(['local', *BACKENDS])}"
            )
        if name not in result:
            result.append(name)
    return result


def _scalar(value: Any) -> float | None:
    """Return ``value`` as a float if it is a real number (incl. 0-d tensors/arrays), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if isinstance(out, (int, float)):
            return float(out)
    return None


class Tracker:
    """Log one stage's metrics and sample completions locally and to the chosen trackers.

    The local files (:class:`~rlhf.tracking.local.LocalFiles`) are always written; each
    other name in ``report_to`` is one backend class of :data:`BACKENDS`.

    Args:
        run_dir: The pipeline run directory; files go to ``<run_dir>/<stage>/``.
        stage: Stage name ("sft", "reward", "ppo", ...); the wandb run name and job type.
        config: The stage's fully resolved config, logged to every remote tracker.
        report_to: Trackers to use, from :data:`REPORT_TO_CHOICES`; "local" is always on.
        group: The pipeline run name: one wandb group / trackio group per pipeline run.
            Defaults to the ``name`` in ``<run_dir>/pipeline.json``, else the directory name.
        refs: Registry references this stage used or produced (base model, adapters,
            dataset versions), logged with the config so a run can be traced to its inputs.
        is_main_process: Only the main process of a distributed run logs; on the others
            every method is a no-op and nothing is written.
        verbose: Also print every logged step to stderr (``rlhf ... --verbose``). Either
            way each step is a line of ``<run_dir>/<stage>/log.txt``. Default:
            ``$RLHF_VERBOSE`` set to 1/true/yes/on.

    Raises:
        ValueError: for an unknown tracker name in ``report_to``.
        ImportError: when a requested tracker's package is missing (before anything is written
            for the local files).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        stage: str,
        *,
        config: Mapping[str, Any],
        report_to: str | Sequence[str] | None = ("local",),
        group: str | None = None,
        refs: Mapping[str, str] | None = None,
        is_main_process: bool = True,
        verbose: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.report_to = normalize_report_to(report_to)
        self.refs = dict(refs or {})
        self.config = dict(config)
        self.enabled = bool(is_main_process)
        self.group = group or self._default_group()
        self.stage_dir = self.run_dir / stage
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.samples_path = self.stage_dir / "samples.jsonl"
        self.log_path = self.stage_dir / "log.txt"
        if verbose is None:
            verbose = os.environ.get("RLHF_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")
        self.verbose = bool(verbose)
        self.backends: dict[str, Backend] = {}
        self._local: LocalFiles | None = None
        self._finished = False
        if not self.enabled:
            return
        info = RunInfo(self.run_dir, self.stage_dir, stage, self.group,
                       {**self.config, "refs": self.refs, "stage": stage, "rlhf_version": rlhf.__version__})
        # A missing optional package fails here, at start-up, not after the first training step.
        for name in self.report_to[1:]:
            self.backends[name] = BACKENDS[name](info)
        self._local = LocalFiles(info, verbose=self.verbose)
        self._local.write_info(self._info())

    def _default_group(self) -> str:
        pipeline_json = self.run_dir / "pipeline.json"
        try:
            name = json.loads(pipeline_json.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        return str(name) if name else self.run_dir.resolve().name

    def _info(self) -> dict[str, Any]:
        try:
            from rlhf.distributed import world_size

            world = world_size()
        except Exception:  # the file is informative; a stage must not fail over it
            world = 1
        return {
            "stage": self.stage,
            "group": self.group,
            "world_size": int(world),
            "refs": {str(k): str(v) for k, v in self.refs.items()},
            "report_to": self.report_to,
            "rlhf_version": rlhf.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    @property
    def wandb_run(self) -> Any:
        """The live wandb run, or None (wandb not requested, or turned off after a failure)."""
        backend = self.backends.get("wandb")
        return getattr(backend, "run", None)

    @property
    def wandb_sync_dir(self) -> Path | None:
        """After an offline wandb run: the directory to pass to ``wandb sync``."""
        return getattr(self.backends.get("wandb"), "sync_dir", None)

    # ------------------------------------------------------------------ logging

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one step's scalar metrics.

        Non-numeric values are ignored (TRL logs strings now and then); numbers that are not
        finite are stored as null in the JSONL file.

        Args:
            metrics: Metric name -> number (Python, numpy or 0-d torch scalars).
            step: Global step the numbers belong to (optimizer steps for SFT/RM, PPO iterations).
        """
        if not self.enabled:
            return
        self._check_open()
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            number = _scalar(value)
            if number is not None and key not in ("step", "time"):
                clean[str(key)] = number
        if not clean:
            return
        for backend in self._all():
            backend.log(clean, int(step))

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record sample completions generated at ``step``.

        Each call makes a new table under ``samples/step_<step>`` so that earlier tables
        stay visible: completions over training are the point.

        Args:
            step: Global step the completions were generated at.
            rows: Dicts with "prompt", "completion", "score" and optionally "gold", plus any
                other per-sample numbers worth a histogram (e.g. "length" in response tokens,
                "kl"); those are kept in samples.jsonl (non-finite as null) and the remote
                tables. Other non-numeric extra fields are dropped.
        """
        if not self.enabled:
            return
        self._check_open()
        records: list[dict[str, Any]] = []
        extra_columns: list[str] = []
        for index, row in enumerate(rows):
            if "prompt" not in row or "completion" not in row:
                raise ValueError(
                    f"log_samples(step={step}): row {index} lacks 'prompt' or 'completion' (keys: {sorted(row)})"
                )
            score = _scalar(row.get("score"))
            gold = _scalar(row.get("gold"))
            record = {
                "step": int(step),
                "prompt": str(row["prompt"]),
                "completion": str(row["completion"]),
                "score": None if score is None else json_number(score),
                "gold": None if gold is None else json_number(gold),
            }
            for name, value in row.items():
                number = _scalar(value)
                if name not in record and name != "time" and number is not None:
                    record[str(name)] = json_number(number)
                    if name not in extra_columns:
                        extra_columns.append(str(name))
            records.append(record)
        columns = [*SAMPLE_COLUMNS, *extra_columns]
        for backend in self._all():
            backend.log_samples(f"samples/step_{int(step)}", columns, records, int(step))

    def callback(
        self,
        *,
        progress: bool = False,
        keys: Sequence[str] = TRAINER_PROGRESS_KEYS,
        interval_s: float | None = None,
        stream: Any = None,
        tty: bool | None = None,
    ) -> Any:
        """A ``transformers.TrainerCallback`` that forwards the trainer's logs to this tracker.

        Use with TRL's SFTTrainer / RewardTrainer and ``report_to="none"`` in their args:
        train logs ("loss", "learning_rate", "grad_norm", ...) and eval logs ("eval_loss",
        "eval_accuracy", ...) arrive through ``on_log`` and are logged at ``state.global_step``.

        Args:
            progress: Also show the stage's progress (a :class:`StageProgress` over
                ``state.max_steps``, with ``keys`` from the latest logs as its metrics).
                Use :meth:`attach`, which also removes transformers' own printers.
            keys: Logged metrics shown on the progress line.
            interval_s, stream, tty: Passed to :class:`StageProgress`.
        """
        from transformers import TrainerCallback

        tracker = self

        class _TrackerCallback(TrainerCallback):
            bar: StageProgress | None = None

            def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 (transformers hook)
                if progress:
                    self.bar = StageProgress(
                        tracker.stage, state.max_steps, initial=state.global_step, interval_s=interval_s,
                        stream=stream, tty=tty, enabled=tracker.enabled,
                    )

            # transformers calls on_step_end, then on_log for that step (when it logs): the
            # record waits for the step's metrics, or for the next step to begin.
            def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 (transformers hook)
                if self.bar is not None:
                    self.bar.update_to(state.global_step, report=False)

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 (transformers hook)
                if self.bar is not None:
                    self.bar.report_if_due()

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 (transformers hook)
                if logs:
                    tracker.log(logs, step=state.global_step)
                    if self.bar is not None:
                        self.bar.set_metrics({k: logs[k] for k in keys if k in logs})
                        self.bar.report_if_due()

            def on_train_end(self, args, state, control, **kwargs):  # noqa: D102 (transformers hook)
                if self.bar is not None:
                    self.bar.close()

        return _TrackerCallback()

    def attach(self, trainer: Any, *, progress: bool = True, **options: Any) -> None:
        """Make a transformers/TRL trainer report through this tracker only.

        Removes transformers' ``ProgressCallback`` and ``PrinterCallback`` (which print every
        log dict, ``{'loss': '3.781', ...}``, to the console) and adds :meth:`callback`: the
        dicts go to metrics.jsonl and the stage log file (and the console with ``verbose``),
        and the console shows one progress bar or record line.

        Args:
            trainer: A ``transformers.Trainer`` (TRL's trainers are ones).
            progress: Show the stage's progress (see :meth:`callback`).
            **options: ``keys``, ``interval_s``, ``stream``, ``tty`` for :meth:`callback`.
        """
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(self.callback(progress=progress, **options))

    def note(self, message: str) -> None:
        """Append a line of text (a stage message, a warning) to the stage log file."""
        if not self.enabled:
            return
        self._check_open()
        self._local.note(message)

    def finish(self) -> None:
        """Close files and remote runs. Safe to call twice."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        for backend in self._all():
            backend.finish()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.finish()

    # ------------------------------------------------------------------ internals

    def _all(self) -> list[Backend]:
        # the local files first: they are the source of truth if a remote tracker misbehaves
        return [self._local, *self.backends.values()]

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"Tracker for stage {self.stage!r} in {self.run_dir} is already finished")
