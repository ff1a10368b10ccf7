"""The command line as a user meets it: help text, config discovery, exits on pipes and Ctrl-C."""

from __future__ import annotations

import argparse
import json
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import cli
from rlhf.cli import config_keys, main
from rlhf.config import ConfigError, PPOConfig, RewardConfig, from_dict

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_top_level_help_lists_every_command_with_a_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf <command>")
    for name, text in cli.COMMANDS.items():
        assert f"  {name}" in out and text in out
    # every command the dispatcher knows is listed (an unknown one is refused with the same list)
    assert main(["nosuch"]) == 2
    assert "unknown command 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo"])
def test_stage_help_lists_every_config_key_with_type_default_and_help(stage, capsys):
    from rlhf.stages import STAGES

    assert main([stage, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf {stage} ")
    keys = config_keys(STAGES[stage].config)
    assert len(keys) > 10
    for key, tp, default, text in keys:
        assert f"  {key}  ({tp}, default {default})" in out
        assert text.split()[0] in out
    if stage == "sft":
        assert "  train.learning_rate  (float, default 0.0002)" in out
        assert "  finetune  (lora|full, default lora)" in out
    if stage == "ppo":
        assert "  reward_clip  (float | null, default null)" in out


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {"run": cli._run_parser(), **{s: cli._stage_parser(s) for s in cli.STAGE_NAMES}}
    return parsers


@pytest.mark.parametrize("command", ["run", "sft", "reward", "ppo", "dpo"])
def test_every_option_appears_in_its_commands_help(command, capsys):
    parser = _parsers()[command]
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf {command} ")
    options = [o for a in parser._actions for o in a.option_strings]
    assert "--launcher" in options and "--verbose" in options and "--progress-interval" in options
    for option in options:
        assert option in out, option


@pytest.mark.parametrize("argv, usage", [
    (["config", "show", "--help"], "usage: rlhf config show"),
    (["generate", "--help"], "usage: rlhf generate"),
    (["dashboard", "--help"], "usage: rlhf dashboard"),
    (["report", "--help"], "usage: rlhf report"),
    (["registry", "--help"], "usage: rlhf registry"),
    (["data", "--help"], "usage: rlhf data"),
])
def test_usage_lines_match_the_command_typed(argv, usage, capsys):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(usage)


def test_help_never_launches(monkeypatch, capsys):
    import rlhf.launch

    def boom(*args, **kwargs):
        raise AssertionError("--help launched accelerate")

    monkeypatch.setattr(rlhf.launch, "launch", boom)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for argv in (["sft", "--launcher", "accelerate", "--help"], ["run", "-h", "--launcher", "accelerate", "x.yaml"]):
        assert main(argv) == 0
        assert "usage: rlhf" in capsys.readouterr().out
    # without --help the launcher is used (so the test above can fail)
    with pytest.raises(AssertionError, match="launched"):
        main(["sft", "--launcher", "accelerate", "dataset=x"])


def test_config_show_stage_prints_resolved_yaml_with_overrides(capsys):
    assert main(["config", "show", "ppo", "kl_coef=0.2", "lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = PPOConfig()
    expected.kl_coef, expected.lora.r = 0.2, 4
    assert shown == dataclasses.asdict(expected)


def test_config_show_recipe_prints_every_stage_as_the_pipeline_builds_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["config", "show", "tiny", "ppo.kl_coef=0.25", "--output-dir", str(tmp_path / "r")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "tiny" and shown["run_dir"] == str(tmp_path / "r")
    assert shown["ppo"]["kl_coef"] == 0.25
    assert shown["ppo"]["sft_adapter"] == str(tmp_path / "r" / "sft" / "adapter")
    assert shown["sft"]["train"]["num_train_epochs"] == 2  # from the recipe, not the dataclass default (1.0)
    assert set(shown["reward"]) == {f.name for f in dataclasses.fields(RewardConfig)}
    assert main(["config", "show", "no-such-recipe"]) == 2
    assert "neither a stage" in capsys.readouterr().err


def test_unknown_key_suggests_the_close_one(capsys):
    with pytest.raises(ConfigError, match=r"did you mean ppo\.kl_coef\?"):
        from_dict(PPOConfig, {"kl_coeff": 0.1}, prefix="ppo")
    with pytest.raises(ConfigError, match=r"did you mean ppo\.lora\.alpha\?"):
        from_dict(PPOConfig, {"lora": {"alpah": 8}}, prefix="ppo")
    with pytest.raises(ConfigError) as err:
        from_dict(PPOConfig, {"zzzzzz": 1}, prefix="ppo")
    assert "did you mean" not in str(err.value)
    assert main(["config", "show", "sft", "trian.num_train_epochs=1"]) == 2
    assert "did you mean sft.train?" in capsys.readouterr().err


def test_broken_pipe_exits_quietly_with_141():
    # the reader is gone before rlhf writes anything: every write hits a closed pipe
    for argv in (["--help"], ["config", "show", "ppo"]):
        proc = subprocess.Popen([sys.executable, "-m", "rlhf", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=900) == 141, err
        assert err == "", err


def test_ctrl_c_exits_quietly_with_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_config_main", interrupted)
    assert main(["config", "show", "sft"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_a_real_process():
    import signal

    # a command that blocks (as a training run does) until SIGINT, which is what Ctrl-C sends
    code = ("import sys, time\n"
            "from rlhf import cli\n"
            "def wait(argv):\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(120)\n"
            "cli._config_main = wait\n"
            "sys.exit(cli.main(['config', 'show', 'sft']))\n")
    # a suite started in the background (nohup, `&` in a script) passes SIGINT on as ignored,
    # and Python then never raises KeyboardInterrupt: the child gets a terminal's default
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


def test_every_command_takes_home(capsys):
    commands = [[c] for c in cli.COMMANDS if c not in ("config", "data", "registry")]
    commands += [["config", "show"], ["data", "ingest"], ["data", "list"], ["registry", "list"], ["registry", "show"]]
    for argv in commands:
        assert main([*argv, "--help"]) == 0
        assert "--home DIR" in capsys.readouterr().out or argv[0] in ("data", "registry"), argv
    # data and registry word it their own way; the option is there all the same
    for argv in (["data", "list", "--help"], ["registry", "list", "--help"]):
        assert main(argv) == 0
        assert "--home" in capsys.readouterr().out


def test_home_option_sets_the_home_of_the_process_and_its_children(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "default"))
    assert main(["config", "show", "sft", "--home", str(tmp_path / "chosen")]) == 0
    assert os.environ["RLHF_HOME"] == str(tmp_path / "chosen")


def test_chat_commands_are_never_sent_to_the_model(monkeypatch):
    import io

    import rlhf.generate as gen

    sent = []

    def fake_sample(policy, conversations, **kw):
        sent.append([m["content"] for m in conversations[0]])
        return [f"reply {len(sent)}"]

    monkeypatch.setattr(gen, "load_policy", lambda *a, **k: "policy")
    monkeypatch.setattr(gen, "sample", fake_sample)
    out = io.StringIO()
    script = "/help\nhello there\n/bogus\n/reset\nagain\n/exit\nnever read\n"
    assert gen.chat_main(["some-policy:1"], stdin=io.StringIO(script), stdout=out) == 0
    assert sent == [["hello there"], ["again"]]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("commands: /help") and "/reset" in lines[0] and "/exit" in lines[0]
    assert lines[1] == "assistant> reply 1"
    assert lines[2].startswith("unknown command /bogus; commands: /help")
    assert lines[3:] == ["(conversation reset)", "assistant> reply 2"]


def test_env_reports_versions_devices_and_paths(tmp_path, capsys):
    import torch

    import rlhf

    home = tmp_path / "h"
    assert main(["env", "--json", "--home", str(home)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["rlhf"] == rlhf.__version__
    assert info["packages"]["transformers"] and info["packages"]["peft"]
    assert info["devices"]["threads"] == torch.get_num_threads()
    assert info["devices"]["cuda"] == torch.cuda.is_available()
    assert info["paths"]["home"] == str(home)
    assert info["paths"]["registry"] == str(home / "registry" / "registry.db")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "devices:" in text and "registry:" in text
    assert main(["--help"]) == 0
    assert "  env " in capsys.readouterr().out


def test_stage_help_lists_the_deprecated_key_names(capsys):
    from rlhf.config import deprecated_keys
    from rlhf.stages import STAGES

    for command in cli.STAGE_NAMES:
        assert main([command, "--help"]) == 0
        help_text = capsys.readouterr().out
        renamed = deprecated_keys(STAGES[command].config)
        assert renamed and all(f"\n  {old} -> {new}\n" in help_text for old, new in renamed), command
        if command == "ppo":
            assert "\n  rloo_k -> num_generations\n" in help_text
        else:
            assert "\n  train.epochs -> train.num_train_epochs\n" in help_text


def test_every_override_example_in_help_is_accepted(capsys):
    import re

    from rlhf.config import apply_overrides
    from rlhf.stages import STAGES

    for command in (*cli.STAGE_NAMES, "run"):
        assert main([command, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        shown = re.findall(r"overrides, e\.g\. (\S+=\S+)", help_text)
        assert shown == [cli.OVERRIDE_EXAMPLES[command]], (command, shown)
        if command == "run":  # a recipe key: a key of a stage section (that stage's config)
            stage, rest = shown[0].split(".", 1)
            from_dict(STAGES[stage].config, apply_overrides({}, [rest]), prefix=stage)
        else:
            from_dict(STAGES[command].config, apply_overrides({}, shown), prefix=command)
