"""`rlhf registry ...` (rlhf.registry.cli.main): output formats and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf.registry import Registry
from rlhf.registry.cli import main


@pytest.fixture
def populated(base_dir, make_adapter, dataset_dir):
    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir))
        reg.register_dataset("prefs", dataset_dir)
        run = reg.start_run("sft", {"lr": 0.1}, ["tiny"])
        sft = reg.register_adapter("sft", "sft", make_adapter(), base="tiny", run=run)
        reg.finish_run(run, "completed", {"loss": 1.5}, outputs=[sft.ref])
        reg.register_adapter("rm", "reward", make_adapter("reward"), base="tiny", parents=["prefs"])
        yield reg


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json(populated, capsys):
    rows = run_json(capsys, ["list", "--json"])
    assert [r["ref"] for r in rows] == ["prefs:1", "rm:1", "run-sft:1", "sft:1", "tiny:1"]
    rows = run_json(capsys, ["list", "--kind", "adapter", "--json"])
    assert [(r["ref"], r["role"]) for r in rows] == [("rm:1", "reward"), ("sft:1", "sft")]


def test_show_json(populated, capsys):
    d = run_json(capsys, ["show", "rm", "--json"])
    assert d["ref"] == "rm:1" and d["kind"] == "adapter" and d["role"] == "reward"
    assert d["metadata"]["base"] == "tiny:1"
    assert set(d["files"]) == {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "rlhf_adapter.json"}
    run = run_json(capsys, ["show", "run-sft:1", "--json"])
    assert run["metadata"]["metrics"] == {"loss": 1.5} and run["metadata"]["status"] == "completed"


def test_lineage_json_and_text(populated, capsys):
    tree = run_json(capsys, ["lineage", "sft:1", "--json"])
    assert {(n["relation"], n["ref"]) for n in tree["ancestors"]} == {("base", "tiny:1"), ("run", "run-sft:1")}
    assert main(["lineage", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "base: rm:1" in text and "input: run-sft:1" in text and "run: sft:1" in text


def test_human_output(populated, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "rm:1" in out and "role=reward" in out


def test_show_is_one_screen_with_lineage_and_the_runs_metrics(populated, capsys):
    assert main(["show", "sft"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 12, out
    assert lines[0] == "sft:1  (adapter, role sft)"
    assert "  base     tiny:1" in lines and "  run      run-sft:1" in lines
    assert any(line.startswith("  lora     r=2 alpha=4 targets=q_proj") for line in lines), out
    assert any(line.startswith("  stage    sft (run-sft:1): completed") for line in lines), out
    assert "  metrics  loss=1.5" in lines
    assert "peft_type" not in out  # the PEFT config is --json's business
    assert main(["show", "rm"]) == 0
    out = capsys.readouterr().out
    assert "  parent   prefs:1" in out and "+ score head" in out
    assert main(["show", "run-sft:1"]) == 0
    assert "  metrics  loss=1.5" in capsys.readouterr().out.splitlines()


def test_list_into_a_closed_pipe_ends_quietly_with_141(populated):
    # `rlhf registry list | head`: the reader is gone; no "Broken pipe" message, exit 141
    for module in (["rlhf", "registry"], ["rlhf.registry"]):
        proc = subprocess.Popen([sys.executable, "-m", *module, "list"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ))
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=900) == 141, err
        assert err == "", err


def test_tag_then_resolve(populated, capsys):
    assert main(["tag", "sft:1", "prod"]) == 0
    assert "sft:prod -> sft:1" in capsys.readouterr().out
    assert run_json(capsys, ["show", "sft:prod", "--json"])["aliases"] == ["prod"]
    assert main(["untag", "sft:prod"]) == 0
    capsys.readouterr()
    assert main(["show", "sft:prod"]) == 1
    assert "not found" in capsys.readouterr().err


def test_verify_exit_codes(populated, capsys):
    assert main(["verify"]) == 0
    assert "OK: 5 entries checked" in capsys.readouterr().out
    (populated.resolve("rm").path / "head.safetensors").unlink()
    assert main(["verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(p["ref"], p["problem"]) for p in report["problems"]] == [("rm:1", "missing")]
    assert main(["verify", "sft"]) == 0


def test_rm_refuses_then_force(populated, capsys):
    assert main(["rm", "tiny"]) == 1
    assert "depend on it" in capsys.readouterr().err
    assert main(["rm", "run-sft:1"]) == 1  # sft:1 was produced by it
    assert "sft:1" in capsys.readouterr().err
    assert main(["rm", "rm:1"]) == 0
    assert main(["rm", "run-sft:1", "--force"]) == 0
    assert "removed run-sft:1" in capsys.readouterr().out
    assert [r["ref"] for r in run_json(capsys, ["list", "--json"])] == ["prefs:1", "sft:1", "tiny:1"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the home names the SQLite file
def test_home_flag_before_or_after_command(tmp_path, base_dir, capsys):
    home = tmp_path / "other_home"
    with Registry.open(home=home) as reg:
        reg.register_base("elsewhere", str(base_dir))
    for argv in (["--home", str(home), "list", "--json"], ["list", "--home", str(home), "--json"]):
        assert [r["ref"] for r in run_json(capsys, argv)] == ["elsewhere:1"]
    # the default home (from $RLHF_HOME) is a different, empty registry
    assert run_json(capsys, ["list", "--json"]) == []


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["list", "--kind", "bogus"]) == 2
    assert main(["show", "a/b"]) == 1
    assert "invalid registry name" in capsys.readouterr().err


def test_python_dash_m(populated):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "rlhf.registry", "list", "--json"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 5
