"""Benchmark the rollout's scoring phase: the frozen roles in one mixed-adapter batch, or apart.

Usage::

    python scripts/bench_scoring.py                              # SmolLM2-135M's shape, CPU, 1 and 3 reward members
    python scripts/bench_scoring.py --shape tiny --repeats 1     # seconds, for a smoke test
    python scripts/bench_scoring.py --shape 0.5B --batch 64 --response-len 128   # on a GPU (bf16)

The PPO stage scores each rollout with four kinds of forward pass: the policy (logprobs and
entropy), the value role, and the frozen roles, the sft reference and every reward-model
member. ``ppo.mixed_adapter_scoring`` decides how the frozen roles run: ``on`` stacks the
batch once per frozen role and runs one forward with each copy under its own adapter (peft's
``adapter_names``), ``off`` runs one forward per role. This script times both on one randomly
initialised model of the shape (nothing is read from disk), for each ensemble size in
``--members``, and checks that they give the same numbers: the largest absolute difference of
the reference logprobs and of the scores is printed beside the times.

Rows: the frozen roles alone (:func:`rlhf.scoring.frozen_role_scores`) and the whole scoring
phase (:func:`rlhf.scoring.score_rollout`, in chunks of ``--chunk`` rows as the stage does).
Each time is the median of ``--repeats`` runs after one warm-up run; the spread (min-max) is
printed too. The last line is JSON with one entry per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ppo  # noqa: E402  (the shapes, the tokenizer and random adapters of the PPO bench)


def random_rollout(batch: int, prompt_len: int, response_len: int, vocab: int, seed: int, device):
    """A sampled batch of random tokens; responses of random lengths, most ending in a stop."""
    import torch

    from rlhf.ppo.rollout import Sampled

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, vocab, (batch, prompt_len), generator=gen)
    responses = torch.randint(100, vocab, (batch, response_len), generator=gen)
    lengths = torch.randint(response_len // 2, response_len + 1, (batch,), generator=gen)
    mask = (torch.arange(response_len)[None] < lengths[:, None]).float()
    responses = torch.where(mask.bool(), responses, torch.zeros_like(responses))
    return Sampled(prompt_ids=prompts.to(device), prompt_mask=torch.ones_like(prompts).to(device),
                   response_ids=responses.to(device), response_mask=mask.to(device),
                   has_stop=(lengths < response_len).to(device))


def timed(fn, repeats: int, device) -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` calls of ``fn`` after one warm-up call; the last result."""
    import torch

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    once()
    runs = [once() for _ in range(repeats)]
    return [s for s, _ in runs], runs[-1][1]


def bench(args) -> list[dict]:
    import torch

    from rlhf.config import ModelConfig, PPOConfig
    from rlhf.scoring import frozen_role_scores, score_rollout

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    vocab = bench_ppo.SHAPES[args.shape]["vocab_size"] if args.shape in bench_ppo.SMOLLM2_SHAPES else bench_ppo.DEFAULT_VOCAB
    spec = bench_ppo.BenchSpec(shape=args.shape, dtype=dtype, seed=args.seed, vocab=vocab)
    for members in args.members:
        model, _, _ = bench_ppo.random_role_model(spec, device, members)
        batch = random_rollout(args.batch, args.prompt_len, args.response_len, vocab, args.seed, device)
        chunk = args.chunk or args.batch
        cfg = PPOConfig(model=ModelConfig(name_or_path="in-memory", dtype=dtype), prompts="in-memory")
        results = {}
        with torch.no_grad():  # the role forwards apply the model's own autocast (bf16 on CUDA)
            for mixed in (True, False):
                def frozen():
                    return frozen_role_scores(model, batch, cfg.temperature, mixed=mixed)

                def whole():
                    return score_rollout(model, batch, dataclasses.replace(
                        cfg, mixed_adapter_scoring="on" if mixed else "off"), chunk=chunk)

                results[mixed] = {"frozen": timed(frozen, args.repeats, device),
                                  "whole": timed(whole, args.repeats, device)}
        m = batch.response_mask.bool()
        (ref_on, sc_on), (ref_off, sc_off) = results[True]["frozen"][1], results[False]["frozen"][1]
        diff_ref = float((ref_on.float() - ref_off.float())[m].abs().max())
        diff_score = float((sc_on.float() - sc_off.float()).abs().max())
        for part in ("frozen", "whole"):
            on, off = results[True][part][0], results[False][part][0]
            rows.append({"members": members, "part": part, "mixed_s": statistics.median(on),
                         "apart_s": statistics.median(off), "mixed_range": [min(on), max(on)],
                         "apart_range": [min(off), max(off)],
                         "speedup_apart": statistics.median(on) / statistics.median(off),
                         "max_diff_ref_logprob": diff_ref, "max_diff_score": diff_score})
        del model
    return rows


def format_table(rows: list[dict], args, device: str) -> str:
    lines = [f"scoring phase, shape {args.shape}, batch {args.batch}, {args.prompt_len}+{args.response_len} tokens, "
             f"device {device}; median of {args.repeats} (min-max)",
             "| reward members | part | mixed s | apart s | apart's speed-up (mixed s / apart s) | max diff ref logprob | max diff score |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        part = "frozen roles" if r["part"] == "frozen" else "whole scoring (policy, value, frozen)"
        lines.append(f"| {r['members']} | {part} | {r['mixed_s']:.3f} ({r['mixed_range'][0]:.3f}-{r['mixed_range'][1]:.3f}) "
                     f"| {r['apart_s']:.3f} ({r['apart_range'][0]:.3f}-{r['apart_range'][1]:.3f}) "
                     f"| {r['speedup_apart']:.2f}x | {r['max_diff_ref_logprob']:.1e} | {r['max_diff_score']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(bench_ppo.SHAPES), default="smollm2-135m")
    p.add_argument("--batch", type=int, default=32, help="Rows scored.")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--chunk", type=int, default=None, help="score_rollout's chunk (the stage: 2 x the micro-batch); "
                   "default the whole batch.")
    p.add_argument("--members", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3],
                   help="Reward-ensemble sizes, comma-separated.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="Default: bf16 on CUDA, else fp32.")
    p.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key in ("batch", "prompt_len", "response_len", "repeats"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if any(m <= 0 for m in args.members):
        p.error("--members: every ensemble size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    rows = bench(args)
    device = bench_ppo.device_name() if args.device != "cpu" else "cpu"
    print(format_table(rows, args, device))
    print(json.dumps({"device": device, "shape": args.shape, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
