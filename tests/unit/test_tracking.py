"""Tracker: local JSONL always, wandb (real offline run and a recording fake), TensorBoard,
trackio (fake), the TRL/transformers callback, non-main processes, and the progress bar."""

from __future__ import annotations

import io
import json
import math
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import rlhf
from rlhf.tracking import StageProgress, Tracker, normalize_report_to, progress, progress_interval


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """A home without ~/.netrc and an environment without an API key or forced mode."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    return home


class FakeWandb(types.ModuleType):
    """Stands in for the wandb module and records what the tracker asks of it."""

    class Settings(dict):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def __init__(self, fail_modes=()):
        super().__init__("wandb")
        self.fail_modes = set(fail_modes)
        self.inits: list[dict] = []
        self.logged: list[dict] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if kwargs["mode"] in self.fail_modes:
            raise ConnectionError(f"no route to host ({kwargs['mode']})")
        module = self

        class Run:
            dir = str(Path(kwargs["dir"]) / "wandb" / "offline-run-x" / "files")
            offline = kwargs["mode"] == "offline"

            def define_metric(self, *args, **kw):
                pass

            def log(self, data):
                module.logged.append(data)

            def finish(self):
                module.finished += 1

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch, no_wandb_credentials):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_local_metrics_and_samples_are_appended_line_by_line(tmp_path):
    tracker = Tracker(tmp_path / "run", "ppo", config={"lr": 1e-5})
    tracker.log({"kl/mean": torch.tensor(0.25), "reward/score_mean": 1, "note": "text", "bad": math.nan}, step=3)
    # Flushed per line: readable before finish(), as the dashboard reads running stages.
    (row,) = _lines(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert row["step"] == 3 and row["kl/mean"] == 0.25 and row["reward/score_mean"] == 1.0
    assert row["bad"] is None and "note" not in row and isinstance(row["time"], float)

    tracker.log_samples(3, [{"prompt": "2+2=", "completion": "4", "score": 0.9, "gold": 1.0}, {"prompt": "a", "completion": "b", "score": torch.tensor(-0.5)}])
    tracker.log({"kl/mean": 0.5}, step=4)
    tracker.finish()
    tracker.finish()  # twice is fine
    assert [r["step"] for r in _lines(tmp_path / "run" / "ppo" / "metrics.jsonl")] == [3, 4]
    samples = _lines(tmp_path / "run" / "ppo" / "samples.jsonl")
    assert samples == [
        {"step": 3, "prompt": "2+2=", "completion": "4", "score": 0.9, "gold": 1.0},
        {"step": 3, "prompt": "a", "completion": "b", "score": -0.5, "gold": None},
    ]
    with pytest.raises(RuntimeError, match="already finished"):
        tracker.log({"x": 1.0}, step=5)

    # A resumed stage appends instead of erasing the curve.
    with Tracker(tmp_path / "run", "ppo", config={}) as again:
        again.log({"kl/mean": 0.75}, step=5)
    assert [r["step"] for r in _lines(tmp_path / "run" / "ppo" / "metrics.jsonl")] == [3, 4, 5]


def test_bad_sample_row_names_the_row(tmp_path):
    tracker = Tracker(tmp_path, "ppo", config={})
    with pytest.raises(ValueError, match=r"row 1 lacks 'prompt' or 'completion'"):
        tracker.log_samples(0, [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])


def test_report_to_validation():
    assert normalize_report_to(None) == ["local"]
    assert normalize_report_to("none") == ["local"]
    assert normalize_report_to("wandb,tensorboard") == ["local", "wandb", "tensorboard"]
    assert normalize_report_to(["tensorboard", "local", "tensorboard"]) == ["local", "tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        normalize_report_to(["comet"])


def test_callback_forwards_real_trainer_logs(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    rows = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    tracker = Tracker(tmp_path / "run", "sft", config={})
    trainer = Trainer(model=Tiny(), args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[tracker.callback()])
    trainer.train()
    tracker.finish()
    logged = _lines(tmp_path / "run" / "sft" / "metrics.jsonl")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 4]
    assert all("learning_rate" in r and "grad_norm" in r for r in logged if "loss" in r)


def test_callback_uses_global_step(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    tracker = Tracker(tmp_path, "reward", config={})
    state = TrainerState()
    state.global_step = 7
    tracker.callback().on_log(TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none"), state, TrainerControl(), logs={"eval_accuracy": 0.75, "eval_margin": 1.5})
    tracker.finish()
    (row,) = _lines(tmp_path / "reward" / "metrics.jsonl")
    assert (row["step"], row["eval_accuracy"], row["eval_margin"]) == (7, 0.75, 1.5)


def test_wandb_real_offline_run_without_credentials(tmp_path, no_wandb_credentials, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "tiny-run", "stages": {}}))
    tracker = Tracker(run_dir, "ppo", config={"lr": 1e-5}, report_to=["wandb"], refs={"base": "base/tiny:v1"})
    assert tracker.group == "tiny-run"
    for step in (0, 5):
        tracker.log({"kl/mean": 0.1 * step}, step=step)
        tracker.log_samples(step, [{"prompt": "p", "completion": f"c{step}", "score": float(step), "gold": None}])
    tracker.finish()

    err = capsys.readouterr().err
    assert f"wandb sync {tracker.wandb_sync_dir}" in err
    assert tracker.wandb_sync_dir.name.startswith("offline-run-") and tracker.wandb_sync_dir.parent == run_dir / "wandb"
    # One table file per evaluation step: the later one did not replace the earlier one.
    tables = sorted((tracker.wandb_sync_dir / "files" / "media" / "table" / "samples").glob("step_*.table.json"))
    assert [p.name.split("_")[1] for p in tables] == ["0", "5"]
    contents = [json.loads(p.read_text()) for p in tables]
    assert contents[0]["columns"] == ["step", "prompt", "completion", "score", "gold"]
    assert [c["data"][0][2] for c in contents] == ["c0", "c5"]
    assert len(_lines(run_dir / "ppo" / "metrics.jsonl")) == 2


def test_wandb_init_arguments_and_tables_per_step(tmp_path, fake_wandb, capsys):
    tracker = Tracker(
        tmp_path / "run",
        "reward",
        config={"lr": 2e-5},
        report_to=["wandb"],
        group="exp-7",
        refs={"base": "base/tiny:v1", "dataset": "data/prefs:v3"},
    )
    (init,) = fake_wandb.inits
    assert init["mode"] == "offline"  # no key, no netrc
    assert (init["group"], init["name"], init["job_type"]) == ("exp-7", "reward", "reward")
    assert init["config"]["lr"] == 2e-5 and init["config"]["rlhf_version"] == rlhf.__version__
    assert init["config"]["refs"] == {"base": "base/tiny:v1", "dataset": "data/prefs:v3"}
    assert init["dir"] == str(tmp_path / "run")
    assert "wandb sync" in capsys.readouterr().err

    tracker.log({"loss": 0.5}, step=1)
    tracker.log_samples(2, [{"prompt": "p", "completion": "c", "score": 1.0}])
    tracker.log_samples(4, [{"prompt": "p", "completion": "d", "score": 2.0}])
    tracker.finish()
    assert fake_wandb.logged[0] == {"loss": 0.5, "trainer/step": 1}
    table_keys = [key for entry in fake_wandb.logged for key in entry if key.startswith("samples/")]
    assert table_keys == ["samples/step_2", "samples/step_4"]
    assert fake_wandb.logged[2]["samples/step_4"].data == [[4, "p", "d", 2.0, None]]
    assert fake_wandb.finished == 1


def test_wandb_with_netrc_credentials_tries_online(tmp_path, fake_wandb, no_wandb_credentials):
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    Tracker(tmp_path, "sft", config={}, report_to=["wandb"]).finish()
    assert fake_wandb.inits[0]["mode"] is None  # wandb's own default (online)


def test_wandb_network_failure_falls_back_and_never_raises(tmp_path, monkeypatch, no_wandb_credentials):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    flaky = FakeWandb(fail_modes={None})
    monkeypatch.setitem(sys.modules, "wandb", flaky)
    with pytest.warns(RuntimeWarning, match="retrying offline"):
        tracker = Tracker(tmp_path, "ppo", config={}, report_to=["wandb"])
    assert [i["mode"] for i in flaky.inits] == [None, "offline"]
    assert tracker.wandb_run is not None
    tracker.finish()

    broken = FakeWandb(fail_modes={None, "offline"})
    monkeypatch.setitem(sys.modules, "wandb", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, "ppo2", config={}, report_to=["wandb"])
    messages = [str(w.message) for w in caught]
    assert any("retrying offline" in m for m in messages) and "wandb logging is off" in messages[-1]
    assert tracker.wandb_run is None
    tracker.log({"loss": 1.0}, step=0)  # local logging carries on
    tracker.finish()
    assert _lines(tmp_path / "ppo2" / "metrics.jsonl")[0]["loss"] == 1.0


def test_wandb_failure_while_logging_is_a_warning(tmp_path, fake_wandb):
    tracker = Tracker(tmp_path, "ppo", config={}, report_to=["wandb"])

    def broken_log(data):
        raise OSError("service went away")

    tracker.wandb_run.log = broken_log
    with pytest.warns(RuntimeWarning, match="service went away"):
        tracker.log({"loss": 1.0}, step=0)
    tracker.log({"loss": 0.5}, step=1)
    tracker.finish()
    assert [r["loss"] for r in _lines(tmp_path / "ppo" / "metrics.jsonl")] == [1.0, 0.5]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(tmp_path, "sft", config={"lr": 1e-4}, report_to=["tensorboard"])
    for step in range(3):
        tracker.log({"loss": 2.0 - step}, step=step)
    tracker.log_samples(2, [{"prompt": "p|q", "completion": "c", "score": 0.5}])
    tracker.finish()
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert "samples/step_2/text_summary" in events.Tags()["tensors"]


def test_trackio_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # makes `import trackio` fail
    with pytest.raises(ImportError, match="'trackio' package is not installed"):
        Tracker(tmp_path, "sft", config={}, report_to=["trackio"])
    assert not (tmp_path / "sft").exists()


def test_trackio_receives_logs(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or object(),
        log=lambda metrics, step=None: calls.append(("log", metrics, step)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "trackio", fake)
    tracker = Tracker(tmp_path, "ppo", config={"a": 1}, report_to="trackio", group="g")
    tracker.log({"kl/mean": 0.1}, step=2)
    tracker.finish()
    assert calls[0][0] == "init" and calls[0][1]["group"] == "g" and calls[0][1]["config"]["a"] == 1
    assert calls[1:] == [("log", {"kl/mean": 0.1}, 2), ("finish",)]


def test_non_main_process_does_nothing(tmp_path, fake_wandb):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, "ppo", config={}, report_to=["wandb", "tensorboard"], is_main_process=False)
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_samples(0, [{"prompt": "p", "completion": "c", "score": 0.0}])
    tracker.finish()
    assert not run_dir.exists()
    assert fake_wandb.inits == [] and fake_wandb.logged == []


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_rate_and_eta_on_a_terminal_only():
    tty = _FakeTTY()
    bar = progress(range(50), desc="rollouts", file=tty, mininterval=0)
    assert not bar.disable
    for _ in bar:
        pass
    out = tty.getvalue()
    assert "rollouts" in out and "50/50" in out
    assert "it/s" in out  # rate
    assert "<00:00" in out  # elapsed<remaining: the ETA

    manual = progress(total=10, desc="gen", file=_FakeTTY(), mininterval=0)
    manual.update(4)
    assert "4/10" in str(manual)
    manual.close()

    piped = io.StringIO()  # not a terminal: tqdm(disable=None) turns itself off
    quiet = progress(range(5), desc="x", file=piped)
    assert quiet.disable and list(quiet) == [0, 1, 2, 3, 4] and piped.getvalue() == ""

    unknown = _FakeTTY()
    for _ in progress(iter(range(3)), desc="stream", file=unknown, mininterval=0):
        pass
    assert "3 [" in unknown.getvalue() and "it/s" in unknown.getvalue()


def test_progress_default_stream_is_stderr(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress(range(2)).disable  # pytest's captured stderr is not a terminal


def test_missing_wandb_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="'wandb' package is not installed"):
        Tracker(tmp_path, "sft", config={}, report_to=["wandb"])
    assert not (tmp_path / "sft").exists()


# ----------------------------------------------------------------------------- console helpers


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stage_progress_prints_records_at_the_interval_off_a_terminal():
    clock, out = _Clock(), io.StringIO()
    bar = StageProgress("ppo", 10, unit="update", interval_s=5, stream=out, clock=clock)
    for t, metrics in ((1, {"score": 0.5, "kl": torch.tensor(0.25)}), (2, {}), (4, {}), (7, {"score": 0.75}), (8, {})):
        clock.now = 100.0 + t
        bar.update(1, metrics)
    # First update at once; then only when 5 s passed since the last record (t=1 -> t=7).
    # ETA = elapsed / done * left: 1/1*9 = 9 s, then 7/4*6 = 10.5 -> 10 s (rounded to even).
    assert out.getvalue().splitlines() == [
        "[ppo] update 1/10 (10%) elapsed 0:00:01 eta 0:00:09 score=0.5 kl=0.25",
        "[ppo] update 4/10 (40%) elapsed 0:00:07 eta 0:00:10 score=0.75 kl=0.25",
    ]
    clock.now = 100.0 + 3725  # 1 h 2 min 5 s
    bar.update(5)  # reaching the total always prints
    bar.close()
    bar.close()
    assert out.getvalue().splitlines()[-1] == "[ppo] update 10/10 (100%) elapsed 1:02:05 eta 0:00:00 score=0.75 kl=0.25"
    assert len(out.getvalue().splitlines()) == 3


def test_stage_progress_close_prints_where_a_stopped_stage_ended():
    clock, out = _Clock(), io.StringIO()
    # A resumed stage: 4 of 10 done before; the ETA uses this run's pace only (2 updates in 10 s).
    bar = StageProgress("ppo", 10, unit="update", initial=4, interval_s=60, stream=out, clock=clock)
    clock.now += 5
    bar.update()
    clock.now += 5
    bar.update()
    bar.close()
    assert out.getvalue().splitlines() == [
        "[ppo] update 5/10 (50%) elapsed 0:00:05 eta 0:00:25",
        "[ppo] update 6/10 (60%) elapsed 0:00:10 eta 0:00:20",
    ]


def test_progress_interval_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("RLHF_PROGRESS_INTERVAL", raising=False)
    assert progress_interval() == 30.0
    monkeypatch.setenv("RLHF_PROGRESS_INTERVAL", "2.5")
    assert progress_interval() == 2.5 and progress_interval(7) == 7.0
    monkeypatch.setenv("RLHF_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="RLHF_PROGRESS_INTERVAL: progress interval must be a positive number"):
        progress_interval()
    with pytest.raises(ValueError, match="interval_s"):
        progress_interval(0)


def test_stage_progress_is_a_bar_on_a_terminal_and_silent_when_disabled():
    tty = _FakeTTY()
    bar = StageProgress("sft", 4, stream=tty, interval_s=1)
    bar.update(2, {"loss": 3.5})
    bar.close()
    text = tty.getvalue()
    assert "sft" in text and "2/4" in text and "loss=3.5" in text and "[sft] step" not in text
    quiet = io.StringIO()
    off = StageProgress("sft", 4, stream=quiet, enabled=False)
    off.update(4)
    off.close()
    assert quiet.getvalue() == ""


def test_every_logged_step_goes_to_the_stage_log_and_to_the_console_only_when_verbose(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLHF_VERBOSE", raising=False)
    tracker = Tracker(tmp_path, "sft", config={})
    tracker.log({"loss": 3.781, "grad_norm": 0.25, "note": "text"}, step=10)
    tracker.note("eval done")
    tracker.finish()
    lines = (tmp_path / "sft" / "log.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["sft step 10: loss=3.781 grad_norm=0.25", "eval done"]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RLHF_VERBOSE", "1")
    with Tracker(tmp_path, "sft", config={}) as loud:
        loud.log({"loss": 2.5}, step=20)
    assert capsys.readouterr().err == "sft step 20: loss=2.5\n"
    assert len((tmp_path / "sft" / "log.txt").read_text().splitlines()) == 3  # appended


def test_log_samples_keeps_extra_numbers_and_tracker_json_records_the_world(tmp_path):
    with Tracker(tmp_path, "ppo", config={}, group="g", refs={"sft_adapter": "a/b"}) as tracker:
        tracker.log_samples(4, [{"prompt": "p", "completion": "c", "score": 0.5, "length": torch.tensor(7), "kl": math.inf, "tag": "x"}])
    (row,) = _lines(tmp_path / "ppo" / "samples.jsonl")
    assert row == {"step": 4, "prompt": "p", "completion": "c", "score": 0.5, "gold": None, "length": 7.0, "kl": None}
    info = json.loads((tmp_path / "ppo" / "tracker.json").read_text())
    assert (info["stage"], info["group"], info["world_size"], info["refs"]) == ("ppo", "g", 1, {"sft_adapter": "a/b"})
    assert not list((tmp_path / "ppo").glob(".*tmp"))


def test_attach_replaces_the_trainers_printed_dicts_with_one_progress_line(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    rows = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(16)]
    records = io.StringIO()
    for disable_tqdm in (False, True):  # transformers prints dicts through either callback
        args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                                 logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                 disable_tqdm=disable_tqdm)
        tracker = Tracker(tmp_path / "run", "sft", config={})
        trainer = Trainer(model=Tiny(), args=args, train_dataset=rows)
        tracker.attach(trainer, stream=records, tty=False, interval_s=3600)
        kinds = {type(cb) for cb in trainer.callback_handler.callbacks}
        assert ProgressCallback not in kinds and PrinterCallback not in kinds
        trainer.train()
        tracker.finish()
        console = capsys.readouterr()
        assert "{'loss'" not in console.out + console.err and "'loss':" not in console.out + console.err
    lines = records.getvalue().splitlines()
    assert [line.split(" elapsed")[0] for line in lines] == ["[sft] step 1/4 (25%)", "[sft] step 4/4 (100%)"] * 2
    losses = [r["loss"] for r in _lines(tmp_path / "run" / "sft" / "metrics.jsonl") if "loss" in r]
    assert lines[-1].endswith(f"loss={losses[-1]:.4g}")


def test_third_party_noise_is_filtered_by_message_only():
    from rlhf.tracking import filter_third_party_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_third_party_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use x instead.", FutureWarning)
        warnings.warn("`something_else` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", UserWarning)
    assert [(w.category, str(w.message)[:16]) for w in caught] == [
        (FutureWarning, "`something_else`"),
        (UserWarning, "`is_gradient_che"),
    ]


def test_stage_progress_phase_shows_work_inside_a_long_step():
    clock, out = _Clock(), io.StringIO()
    bar = StageProgress("ppo", 4, unit="update", interval_s=5, stream=out, clock=clock)
    clock.now += 2
    bar.phase("update 1: generating")  # 2 s after the start: not due yet
    clock.now += 4
    bar.phase("update 1: minibatch 3/8")  # 6 s: due, although no update has finished
    clock.now += 1
    bar.phase("update 1: minibatch 4/8")  # 1 s after that record: not due
    clock.now += 1
    bar.update(1, {"score": 0.5})  # the record after a finished update carries no stale phase
    clock.now += 10
    bar.update(1)
    assert out.getvalue().splitlines() == [
        "[ppo] update 0/4 (0%) elapsed 0:00:06 eta ? (update 1: minibatch 3/8)",
        "[ppo] update 2/4 (50%) elapsed 0:00:18 eta 0:00:18 score=0.5",
    ]


def test_stage_progress_phase_redraws_the_terminal_bar():
    out = io.StringIO()
    bar = StageProgress("ppo", 4, unit="update", stream=out, tty=True)
    bar.phase("update 1: scoring")
    assert "(update 1: scoring)" in out.getvalue()
    bar.close()


def test_a_new_backend_is_one_class_and_one_registration(tmp_path, monkeypatch):
    """Every tracker is a class behind the Backend protocol in rlhf.tracking.BACKENDS: a
    registered one receives the cleaned metrics, the sample tables and finish, after the
    local files (which stay the source of truth)."""
    from rlhf.tracking import BACKENDS

    calls = []

    class Recorder:
        def __init__(self, info):
            calls.append(("init", info.stage, info.group, info.config["lr"], info.stage_dir))

        def log(self, metrics, step):
            calls.append(("log", dict(metrics), step))

        def log_samples(self, key, columns, records, step):
            calls.append(("samples", key, list(columns), [r["completion"] for r in records], step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setitem(BACKENDS, "recorder", Recorder)
    assert normalize_report_to("recorder") == ["local", "recorder"]
    tracker = Tracker(tmp_path, "ppo", config={"lr": 0.1}, report_to=["recorder"], group="g")
    tracker.log({"kl": torch.tensor(0.5), "note": "text"}, step=3)
    tracker.log_samples(3, [{"prompt": "p", "completion": "c", "score": 1.0, "length": 2}])
    tracker.finish()
    assert calls == [("init", "ppo", "g", 0.1, tmp_path / "ppo"), ("log", {"kl": 0.5}, 3),
                     ("samples", "samples/step_3", ["step", "prompt", "completion", "score", "gold", "length"], ["c"], 3),
                     ("finish",)]
    assert _lines(tmp_path / "ppo" / "metrics.jsonl")[0]["kl"] == 0.5
    with pytest.raises(ValueError, match="unknown tracker 'comet'; choose from local, wandb, tensorboard, trackio, mlflow"):
        monkeypatch.delitem(BACKENDS, "recorder")
        normalize_report_to("comet")
