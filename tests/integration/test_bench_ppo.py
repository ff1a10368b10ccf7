"""scripts/bench_ppo.py: argument parsing, shapes, the shared workspace and our side of the run.

The TRL 1.12 side needs its own environment (installed from the registry or a wheel), so the
end-to-end run of both sides is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ppo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ppo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ppo"] = module
    spec.loader.exec_module(module)
    return module


# ---- arguments ----------------------------------------------------------------------------


def test_defaults_follow_the_shape(bench):
    args = bench.parse_args(["--shape", "0.5B"])
    assert args.modes == ["full", "lora"]
    spec = bench._spec_from_args(args, "0.5B", cuda=True)
    # the GPU setting: bf16, 64 prompts of 64 tokens, 128-token responses, 4 x 4
    assert (spec.dtype, spec.batch, spec.prompt_len, spec.response_len, spec.num_minibatches, spec.ppo_epochs) == (
        "bfloat16", 64, 64, 128, 4, 4)
    assert spec.vocab == 32000 and spec.generation == "auto"  # the published anchor's vocabulary
    tiny = bench._spec_from_args(bench.parse_args([]), "tiny", cuda=False)
    assert tiny.dtype == "float32" and tiny.shape == "tiny" and tiny.vocab == 32000
    small = bench._spec_from_args(bench.parse_args(["--vocab", "1000", "--generation", "static", "--micro-batch", "2"]),
                                  "small", cuda=False)
    assert (small.vocab, small.generation, small.micro_batch_size) == (1000, "static", 2)


def test_overrides_and_modes(bench):
    args = bench.parse_args(["--shape", "tiny", "--modes", "lora", "--batch", "12", "--num-minibatches", "3",
                             "--response-len", "5"])
    spec = bench._spec_from_args(args, "tiny", cuda=False)
    assert args.modes == ["lora"] and (spec.batch, spec.num_minibatches, spec.response_len, spec.minibatch) == (12, 3, 5, 4)
    assert bench.parse_args(["--modes", ""]).modes == []


@pytest.mark.parametrize("argv", [["--modes", "full,qlora"], ["--shape", "70B"], ["--batch", "0"],
                                  ["--max-size", "--shapes", "0.5B,2B"]])
def test_bad_arguments_exit(bench, argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_spec_rejects_indivisible_batch(bench):
    with pytest.raises(ValueError, match="divisible by --num-minibatches"):
        bench.BenchSpec(batch=10, num_minibatches=4)
    assert bench.main(["--batch", "10", "--num-minibatches", "4", "--modes", ""]) == 2


def test_qwen_shapes_match_published_parameter_counts(bench):
    """Built on the meta device: the counts of the Qwen2.5 model cards, to the parameter."""
    import torch
    from transformers import Qwen2ForCausalLM

    tok = bench.build_tokenizer(1000)
    expected = {"0.5B": 494_032_768, "1.5B": 1_543_714_304, "3B": 3_085_938_688,
                "7B": 7_615_616_512, "14B": 14_770_033_664, "32B": 32_763_876_352}
    for shape, n in expected.items():
        with torch.device("meta"):
            model = Qwen2ForCausalLM(bench.qwen2_config(shape, tok))
        assert sum(p.numel() for p in model.parameters()) == n, shape


def test_tokenizer_has_the_shape_vocab(bench):
    tok = bench.build_tokenizer(300)
    assert len(tok) == 300
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False, add_generation_prompt=True)
    assert len(tok(text, add_special_tokens=False).input_ids) == 2 + bench.TEMPLATE_TOKENS
    assert tok.convert_tokens_to_ids(bench.STOP_TOKEN) != tok.unk_token_id


# ---- ratios and the last line -----------------------------------------------------------


def _fake(total, gen, score, peak):
    return {"updates": [{"total_s": 99.0, "generate_s": 50.0, "score_s": 9.0, "update_s": 40.0}]
            + [{"total_s": total, "generate_s": gen, "score_s": score, "update_s": total - gen - score}] * 2,
            "peak_gb": peak, "peak_kind": "cuda max_memory_allocated"}


def test_summary_excludes_warmup_and_takes_the_harder_baseline(bench, capsys):
    spec = bench.BenchSpec(shape="tiny", batch=8, num_minibatches=2, n_batches=3)
    ours = bench.summarize(_fake(2.0, 1.0, 0.5, 4.0), spec)
    assert ours["sec_per_batch"] == 2.0 and ours["eps_per_s"] == 4.0  # the 99 s warm-up is not counted
    trl = {"full": bench.summarize(_fake(8.0, 2.0, 1.0, 16.0), spec),  # faster TRL mode
           "lora": bench.summarize(_fake(10.0, 3.0, 1.0, 12.0), spec)}  # leaner TRL mode
    out = bench.summary_json(ours, trl, "NVIDIA H100", spec)
    assert out["speedup"] == 4.0 and out["trl_eps_mode"] == "full"  # 4 eps / 1 eps
    assert out["trl_peak_gb"] == 12.0 and out["trl_peak_mode"] == "lora"
    assert out["modes"]["lora"]["speedup"] == 5.0 and out["modes"]["full"]["peak_ratio"] == 0.25
    for key in ("ours_eps_per_s", "trl_eps_per_s", "speedup", "ours_peak_gb", "trl_peak_gb", "device"):
        assert key in out
    # per-phase seconds: ours, TRL's best-eps mode, and every mode
    assert (out["ours_generate_s"], out["ours_score_s"], out["ours_update_s"]) == (1.0, 0.5, 0.5)
    assert (out["trl_generate_s"], out["trl_update_s"]) == (2.0, 5.0)  # the full mode (best eps)
    assert out["modes"]["lora"]["trl_generate_s"] == 3.0 and out["modes"]["lora"]["trl_score_s"] == 1.0
    table = bench.format_table(spec, "NVIDIA H100", ours, trl)
    assert "ratio ours/TRL LoRA" in table and "5.00x" in table and "generate  50.0%" in table


# ---- the workspace and our side, for real on the tiny shape ------------------------------


def test_workspace_and_our_side_run(bench, tmp_path):
    from safetensors.torch import load_file

    spec = bench.BenchSpec(shape="tiny", batch=4, prompt_len=8, response_len=4, num_minibatches=2, ppo_epochs=1,
                           n_batches=2, vocab=512, generation="static")
    work = bench.build_workspace(spec, tmp_path / "ws")
    ids = json.loads((work / "prompt_ids.json").read_text())
    assert len(ids) == 8 and all(len(x) == 8 for x in ids)
    assert len((work / "prompts.jsonl").read_text().splitlines()) == 8
    assert load_file(str(work / "reward_adapter" / "head.safetensors"))["weight"].shape == (1, 64)
    assert json.loads((work / "model" / "config.json").read_text())["vocab_size"] == 512
    assert (work / "sft_adapter" / "adapter_config.json").is_file()
    assert bench.load_spec(work) == spec

    result = bench.run_ours(work, tmp_path / "run")
    assert len(result["updates"]) == 2  # one per rollout batch, warm-up included
    for u in result["updates"]:
        assert u["total_s"] > 0 and min(u["generate_s"], u["score_s"], u["update_s"]) >= 0
        assert u["generate_s"] + u["score_s"] + u["update_s"] <= u["total_s"] * 1.01
    assert result["peak_gb"] > 0 and result["device"] == "cpu"
    # every response ran to full length: the stop token is one random weights rarely emit
    rows = [json.loads(x) for x in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["response/length_mean"] for r in rows if "response/length_mean" in r]
    assert lengths and min(lengths) > 0.5 * spec.response_len


def test_size_probe_runs_one_update_in_memory(bench, tmp_path, monkeypatch):
    """--max-size's worker: a shape built in memory (nothing on disk) runs one PPO update."""
    import torch

    monkeypatch.chdir(tmp_path)
    spec = bench.BenchSpec(shape="tiny", batch=4, prompt_len=8, response_len=4, num_minibatches=2, ppo_epochs=1,
                           n_batches=1, vocab=512, gradient_checkpointing=True, micro_batch=1, generation="static")
    res = bench.run_probe(spec)
    assert res["optimizer_steps"] == 2.0 and res["peak_gb"] > 0 and res["shape"] == "tiny"
    assert list(tmp_path.iterdir()) == []  # wrote nothing
    assert torch.is_grad_enabled()  # grad mode restored


def test_offline_wheel_install_takes_only_missing_ones(bench, tmp_path, monkeypatch):
    """A wheel of an installed distribution is skipped; a missing one is installed offline."""
    import zipfile

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")

    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("torch-9.9.9-py3-none-any.whl", "trl-1.12.0-py3-none-any.whl"):  # present / venv-only
        (wheels / name).write_bytes(b"not a wheel")
    dist = "rlhf_bench_probe_pkg-0.1.dist-info"
    with zipfile.ZipFile(wheels / "rlhf_bench_probe_pkg-0.1-py3-none-any.whl", "w") as z:
        z.writestr("rlhf_bench_probe_pkg/__init__.py", "VALUE = 7\n")
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: rlhf-bench-probe-pkg\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    target = tmp_path / "site"
    assert bench.install_missing_wheels(wheels, target) == ["rlhf-bench-probe-pkg"]
    import rlhf_bench_probe_pkg

    assert rlhf_bench_probe_pkg.VALUE == 7 and str(target) in __import__("os").environ["PYTHONPATH"]


@pytest.mark.slow
def test_both_sides_end_to_end(bench, tmp_path, capsys):
    """Creates the TRL 1.12 venv (registry or .bench/wheels) and runs ours, TRL full and TRL LoRA."""
    code = bench.main(["--shape", "tiny", "--vocab", "512", "--batch", "4", "--prompt-len", "8", "--response-len", "4",
                       "--ppo-epochs", "1", "--num-minibatches", "2", "--trl-env", str(tmp_path / "trl112")])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["modes"]) == {"full", "lora"} and last["speedup"] > 0 and last["trl_peak_gb"] > 0


def test_the_smollm2_shape_is_the_real_models(bench):
    """--shape smollm2-135m is SmolLM2-135M: 134,515,008 parameters as a Llama; the Qwen2 build
    adds q/k/v biases (30 layers x (576 + 192 + 192)). It keeps its own 49152-token vocabulary."""
    import torch
    from transformers import Qwen2ForCausalLM

    spec = bench._spec_from_args(bench.parse_args(["--shape", "smollm2-135m"]), "smollm2-135m", cuda=False)
    assert (spec.vocab, spec.dtype) == (49152, "float32")
    assert bench.SHAPES["smollm2-135m"] == bench.SHAPES["smollm2"]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(bench.qwen2_config("smollm2-135m", bench.build_tokenizer(1000), spec.vocab))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + 30 * (576 + 192 + 192)
