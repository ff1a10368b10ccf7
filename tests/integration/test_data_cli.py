"""`rlhf data` end to end through ``reward_data.cli.main`` and ``python -m reward_data``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reward_data.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"a good answer {i}", "rejected": f"bad {i}"} for i in range(40)]
    rows += [rows[0], {"prompt": "q", "chosen": "", "rejected": "x"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return path


def test_split_in_ingest_is_a_deprecated_spelling_of_test_fraction(pairs_file, tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["ingest", str(pairs_file), "--name", "old", "--split", "test=0.25", "--home", home]) == 0
    err = capsys.readouterr().err
    assert "rlhf data ingest: warning: --split test=0.25 is deprecated; use --test-fraction 0.25" in err
    assert main(["ingest", str(pairs_file), "--name", "new", "--test-fraction", "0.25", "--home", home]) == 0
    assert "deprecated" not in capsys.readouterr().err
    shown = {}
    for name in ("old", "new"):
        assert main(["show", name, "--json", "--home", home]) == 0
        shown[name] = json.loads(capsys.readouterr().out)
    assert (shown["old"]["train"], shown["old"]["test"]) == (shown["new"]["train"], shown["new"]["test"])
    assert shown["new"]["test"] > 0
    assert main(["ingest", str(pairs_file), "--name", "both", "--split", "0.1", "--test-fraction", "0.1",
                 "--home", home]) == 1
    assert "give --test-fraction only" in capsys.readouterr().err


def test_ingest_list_show_quarantine(pairs_file, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["ingest", str(pairs_file), "--name", "demo", "--test-fraction", "0.25", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "demo:1: 40 accepted" in out and "1 duplicates" in out and "2 quarantined from 43 rows" in out

    assert main(["--home", str(home), "list"]) == 0  # --home works before the subcommand too
    assert "demo:1" in capsys.readouterr().out

    assert main(["show", "demo", "--json", "--home", str(home)]) == 0
    shown = json.loads(capsys.readouterr().out)
    for key, value in {"rows_in": 43, "accepted": 40, "duplicates": 1, "quarantined": 2}.items():
        assert shown[key] == value
    assert shown["train"] + shown["test"] == 40 and shown["test"] > 0
    assert shown["reconciles"] is True
    assert shown["quarantine_reasons"] == {"empty_text": 1, "malformed_json": 1}
    assert shown["stats"]["prompt_chars"]["p50"] >= len("question 1")
    assert shown["sources"][0]["sha256"]

    assert main(["show", "demo:1", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    assert "rows_in 43 = accepted 40 + duplicates 1 + quarantined 2  [ok]" in text
    assert "MISMATCH" not in text
    assert "empty_text: 1" in text and "prompt_chars" in text and "tie rate" in text

    assert main(["quarantine", "demo", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    # 1-based lines, as an editor shows them (row 41 is on line 42).
    assert "pairs.jsonl:42  empty_text: field 'chosen' is empty or whitespace" in text
    assert "pairs.jsonl:43  malformed_json" in text
    assert main(["quarantine", "demo", "--reason", "malformed_json", "--json", "--home", str(home)]) == 0
    (entry,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert entry["source"] == {"file": "pairs.jsonl", "row": 42, "line": 43}


def test_errors_exit_nonzero_with_message(pairs_file, tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["show", "nothing", "--home", home]) == 1
    assert "dataset 'nothing' not found" in capsys.readouterr().err
    amb = tmp_path / "amb.jsonl"
    amb.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "response_0": "x", "response_1": "y",
                               "label": 0}) + "\n")
    assert main(["ingest", str(amb), "--name", "amb", "--home", home]) == 1
    err = capsys.readouterr().err
    assert "ambiguous" in err and "explicit, two_response" in err
    assert main(["ingest", str(pairs_file), "--name", "x", "--map", "prompt", "--home", home]) == 1
    assert "expected key=column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ingest", str(pairs_file), "--name", "x", "--format", "xml"])


def test_map_and_reader_options_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "arena.jsonl"
    rows = [{"question": "q1", "response_a": "A", "response_b": "B", "winner": "tie"},
            {"question": "q2", "response_a": "A2", "response_b": "B2", "winner": "model_b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = str(tmp_path / "home")
    assert main(["ingest", str(path), "--name", "arena", "--ties", "keep", "--test-fraction", "0", "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "arena", "--json", "--home", home]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["accepted"] == 2 and shown["stats"]["ties"] == 1
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"q": "hello", "good": "hi", "bad": "go"}) + "\n")
    assert main(["ingest", str(g), "--name", "g", "--map", "prompt=q", "--map", "chosen=good", "--map", "rejected=bad",
                 "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "g", "--json", "--home", home]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format"] == "generic" and shown["accepted"] == 1


def test_show_with_tokenizer(pairs_file, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("question a good answer bad".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    home = str(tmp_path / "home")
    assert main(["ingest", str(pairs_file), "--name", "demo", "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "demo", "--json", "--tokenizer", str(tmp_path / "tok"), "--home", home]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    # "question 7" -> 2 tokens; "a good answer 7" -> 4; "bad 7" -> 2 (digits are [UNK] words).
    assert (stats["prompt_tokens"]["min"], stats["prompt_tokens"]["max"]) == (2, 2)
    assert stats["chosen_tokens"]["p50"] == 4 and stats["rejected_tokens"]["p50"] == 2
    assert main(["show", "demo", "--tokenizer", str(tmp_path / "tok"), "--home", home]) == 0
    assert "chosen_tokens" in capsys.readouterr().out


def test_python_dash_m_reward_data(pairs_file, tmp_path):
    env = dict(os.environ, RLHF_HOME=str(tmp_path / "envhome"), PYTHONPATH=str(REPO))
    run = lambda *args: subprocess.run([sys.executable, "-m", "reward_data", *args], env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=900)
    r = run("ingest", str(pairs_file), "--name", "m")
    assert r.returncode == 0, r.stderr
    r = run("show", "m:latest", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"] == 40
    assert (tmp_path / "envhome" / "data" / "m" / "1" / "manifest.json").is_file()


def _hub_folder(root: Path) -> Path:
    """A dataset folder laid out like a hub repository: two configs (README `configs:`), each with
    train/test files, for `datasets.load_dataset` on a local path (offline)."""
    for config in ("helpful", "harmless"):
        for split, n in (("train", 4), ("test", 2)):
            d = root / config
            d.mkdir(parents=True, exist_ok=True)
            rows = [{"prompt": f"{config} {split} {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = "\n".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl" for c in ("helpful", "harmless"))
    (root / "README.md").write_text(f"---\nconfigs:\n{files}\n---\n# tiny preference data\n")
    return root


def test_hub_dataset_config_data_dir_and_split(tmp_path, capsys):
    hub = _hub_folder(tmp_path / "org_name")
    home = str(tmp_path / "home")
    assert main(["ingest", str(hub), "--name", "cfg", "--hf-config", "harmless", "--hf-split", "test",
                 "--test-fraction", "0", "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "cfg", "--json", "--home", home]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["accepted"] == 2
    (src,) = shown["sources"]
    assert (src["hf_config"], src["hf_split"], src["kind"]) == ("harmless", "test", "hf_hub")
    prompts = {r["prompt"][0]["content"] for r in __import__("reward_data").read_split(shown["path"], "train")}
    assert prompts == {"harmless test 0", "harmless test 1"}
    # data_dir selects one folder; without a split every split of it is read.
    assert main(["ingest", str(hub), "--name", "dd", "--hf-data-dir", "helpful", "--test-fraction", "0", "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "dd", "--json", "--home", home]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted((s["hf_split"], s["rows_in"], s["hf_data_dir"]) for s in shown["sources"]) == [
        ("test", 2, "helpful"), ("train", 4, "helpful")]
    # A split that does not exist is a one-line error naming what does.
    assert main(["ingest", str(hub), "--name", "bad", "--hf-config", "helpful", "--hf-split", "dev",
                 "--home", home]) == 1
    assert "dev" in capsys.readouterr().err


def test_misconfigured_ingest_exits_nonzero_and_publishes_nothing(tmp_path, capsys):
    path = tmp_path / "qa.csv"
    path.write_text("question,good,bad\nq1,a,b\nq2,c,d\n")
    home = tmp_path / "home"
    rc = main(["ingest", str(path), "--name", "qa", "--map", "prompt=qestion", "--map", "chosen=good",
               "--map", "rejected=bad", "--home", str(home)])
    err = capsys.readouterr().err
    assert rc == 1 and "no such column" in err and "'qestion' -> 'question'" in err
    rc = main(["ingest", str(path), "--name", "qa", "--format", "shp", "--home", str(home)])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing was accepted from 2 rows" in err and "columns seen: bad, good, question" in err
    assert not (home / "data" / "qa").exists() or not any((home / "data" / "qa").iterdir())
    assert main(["ingest", str(path), "--name", "qa", "--format", "shp", "--allow-partial", "--home", str(home)]) == 0


def test_show_prints_resolved_options_and_shortcut_warnings(tmp_path, capsys):
    path = tmp_path / "pku.jsonl"
    rows = [{"prompt": f"q{i}", "response_0": f"Sure, here it is {i}", "response_1": f" no{i}",
             "better_response_id": 0, "safer_response_id": 1} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = str(tmp_path / "home")
    assert main(["ingest", str(path), "--name", "pku", "--home", home]) == 0
    assert "possible shortcut" in capsys.readouterr().err
    assert main(["show", "pku", "--home", home]) == 0
    text = capsys.readouterr().out
    assert "resolved: format=two_response label_field=better_response_id" in text
    assert "options: format=default" in text and "ties=drop" in text
    assert "warning: possible shortcut: 100% of rejected responses start with whitespace" in text
    assert main(["show", "pku", "--json", "--home", home]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["resolved_options"]["label_field"] == "better_response_id"
    assert shown["options"]["label_field"] is None and shown["warnings"]


def test_scored_and_system_from_the_command_line(tmp_path, capsys):
    nemo = "<extra_id_0>System\n{s}\n<extra_id_1>User\n{u}\n<extra_id_1>Assistant\n{a}\n"
    rows = [{"text": nemo.format(s="Be brief.", u="2+2?", a=ans), "helpfulness": h, "correctness": c}
            for ans, h, c in (("4", 4, 4), ("5", 1, 0), ("four", 3, 4))]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = str(tmp_path / "home")
    assert main(["ingest", str(path), "--name", "hs", "--score", "helpfulness*0.5+correctness*0.5",
                 "--transcript-template", "nemo", "--binarize", "all_pairs", "--test-fraction", "0", "--home", home]) == 0
    capsys.readouterr()
    import reward_data

    recs = list(reward_data.read_split(reward_data.resolve("hs", home), "train"))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in recs] == [
        ("4", "four", 0.5), ("4", "5", 3.5), ("four", "5", 3.0)]
    assert recs[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    sys_csv = tmp_path / "sys.csv"
    sys_csv.write_text("system,question,chosen,rejected\nBe kind.,hi,hello,go\n")
    assert main(["ingest", str(sys_csv), "--name", "sys", "--map", "system=system", "--map", "prompt=question",
                 "--map", "chosen=chosen", "--map", "rejected=rejected", "--home", home]) == 0
    capsys.readouterr()
    assert main(["show", "sys", "--home", home]) == 0
    assert "with system prompt: 1" in capsys.readouterr().out
