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


def test_ingest_list_show_quarantine(pairs_file, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["ingest", str(pairs_file), "--name", "demo", "--split", "test=0.25", "--home", str(home)]) == 0
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
    assert main(["ingest", str(path), "--name", "arena", "--ties", "keep", "--split", "0", "--home", home]) == 0
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
                                       capture_output=True, text=True, timeout=120)
    r = run("ingest", str(pairs_file), "--name", "m")
    assert r.returncode == 0, r.stderr
    r = run("show", "m:latest", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"] == 40
    assert (tmp_path / "envhome" / "data" / "m" / "1" / "manifest.json").is_file()
