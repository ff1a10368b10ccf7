"""``rlhf eval``: score policies on a prompt set, and reward models on preference data.

Policies (any reference :func:`rlhf.generate.load_policy` accepts) are sampled once per
prompt with one seed and judged by a reward model and/or an objective; every mean comes
with its standard error over prompts. The first policy is the baseline: each other policy
(and the best-of-n baseline) gets its win rate over it on the same prompts (1 for a
higher score, 0.5 for a tie), by the reward model and by the objective. Sampling
(:func:`rlhf.evaluation.sample_completions`, through :func:`rlhf.generate.sample`) and the
statistics (:func:`rlhf.evaluation.compare_policies`) are the evaluation module's, the ones PPO
and DPO report with.

  rlhf eval --policy SFT_REF --policy PPO_REF --prompts FILE [--reward RM_REF]
            [--objective my_pkg.my_task:MyTask | path/to/task.py:MyTask | builtin:synthetic]
            [--best-of N] [--out report.json]
  rlhf eval --reward RM_REF --preferences DATA [--split test]

``--best-of N`` samples N completions per prompt from the first policy (the SFT policy)
and keeps the one the reward model scores highest: the baseline a PPO policy should beat.
``--preferences`` reports the reward model's accuracy (and margin) on an ingested dataset
(``NAME[:VERSION]`` or a file, ingested first), overall and per source subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf import evaluation
from rlhf.atomic import write_text
from rlhf.paths import add_home_option, use_home

Conversation = list[dict]

#: The per-prompt numbers a policy gets a win rate over the baseline by, and the report's key for it.
WIN_RATES = {"rm_score": "win_rate_rm", "objective": "win_rate_objective"}


def reward_scorer(ref: str, dtype: str | None = None) -> Callable[[list[tuple[Conversation, Conversation]]], list[float]]:
    """``score([(prompt messages, response messages), ...])`` by the reward adapter ``ref``
    (registry reference or directory), on the base and chat template it was trained with."""
    from rlhf.adapters import RoleModel
    from rlhf.config import ConfigError
    from rlhf.adapters import adapter_facts as _adapter_facts
    from rlhf.generate import resolve_policy
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.ppo.rollout import Sampled
    from rlhf.generation import left_pad
    from rlhf.scoring import last_token_scores

    kind, where = resolve_policy(ref)
    if kind != "adapter" or not (Path(where) / "head.safetensors").is_file():
        raise ConfigError(f"--reward {ref}: not a reward adapter (no head.safetensors)")
    base, template, saved_dtype = _adapter_facts(Path(where))
    if base is None:
        raise ConfigError(f"--reward {ref}: the adapter does not name its base model")
    tok = load_tokenizer(base, chat_template=template, adapter_dir=where)
    model = RoleModel(load_causal_lm(base, tok, dtype=dtype or saved_dtype), None, str(where))
    model.eval()

    @torch.no_grad()
    def score(items: list[tuple[Conversation, Conversation]], batch: int = 32) -> list[float]:
        out: list[float] = []
        for s in range(0, len(items), batch):
            seqs = [tok(tok.apply_chat_template(p + r, tokenize=False), add_special_tokens=False).input_ids
                    for p, r in items[s: s + batch]]
            ids, mask = left_pad(seqs, tok.pad_token_id, "cpu")
            # the whole conversation as the "response": the score lands on its last real token
            b = Sampled(ids[:, :0], mask[:, :0], ids, mask.float(), torch.ones(len(seqs), dtype=torch.bool))
            out += last_token_scores(model, "reward", b).tolist()
        return out

    return score


def load_objective(spec: str) -> Callable[[str, str], float]:
    """``objective(prompt text, completion text) -> float`` from ``spec``: ``builtin:synthetic``
    or ``builtin:format`` (the embedded tasks' gold rewards), or ``module:attr`` /
    ``file.py:attr`` naming a task class (its ``evaluate``), a task object or a function."""
    from rlhf.config import ConfigError

    if spec.startswith("builtin:"):
        from rlhf.tasks.synthetic import GOLD_REWARDS

        name = spec.split(":", 1)[1]
        if name not in GOLD_REWARDS:
            raise ConfigError(f"--objective: unknown built-in {name!r} (built-ins: {', '.join(GOLD_REWARDS)})")
        return GOLD_REWARDS[name]
    import importlib
    import importlib.util

    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"--objective: {spec!r} must look like module:attr, file.py:attr or builtin:NAME")
    try:
        if target.endswith(".py"):
            s = importlib.util.spec_from_file_location(f"rlhf_user_objective_{Path(target).stem}", target)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        obj = getattr(module, attr)
    except Exception as e:  # noqa: BLE001 - reported with the option named
        raise ConfigError(f"--objective: cannot load {spec!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, type):
        obj = obj()
    fn = getattr(obj, "evaluate", obj)
    if not callable(fn):
        raise ConfigError(f"--objective: {spec} is neither a function nor has an evaluate method")
    return fn


def evaluate_policies(policies: list[str], prompts: list[Conversation], *, reward: str | None = None,
                      objective: Callable[[str, str], float] | None = None, best_of: int = 0,
                      max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0, engine: str = "hf") -> dict:
    """Sample each policy once per prompt; score; win rates over the first policy.

    Returns:
        ``{"prompts": n, "policies": {name: {"rm_score", "objective", "length", "win_rate_rm",
        "win_rate_objective"}}}`` with ``{"mean", "se", "n"}`` values; a best-of-n baseline
        appears as ``"best-of-N(<first policy>)"``.
    """
    from rlhf.generate import load_policy, sample

    if reward is None and objective is None:
        from rlhf.config import ConfigError

        raise ConfigError("rlhf eval: give --reward and/or --objective to judge the policies by")
    score = reward_scorer(reward) if reward else None
    texts: dict[str, list[str]] = {}
    for i, ref in enumerate(policies):
        policy = load_policy(ref)
        texts[ref] = sample(policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            engine=engine)
        if i == 0 and best_of > 1:
            if score is None:
                from rlhf.config import ConfigError

                raise ConfigError("--best-of needs --reward (the reward model picks the best sample)")
            cands = [sample(policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 1 + k,
                            engine=engine)
                     for k in range(best_of)]
            best = []
            for j, p in enumerate(prompts):
                options = [c[j] for c in cands]
                s = score([(p, [{"role": "assistant", "content": o}]) for o in options])
                best.append(options[max(range(best_of), key=lambda k: s[k])])
            texts[f"best-of-{best_of}({ref})"] = best
        del policy
    user_turns = [p[-1]["content"] for p in prompts]
    judged: dict[str, dict[str, list[float]]] = {}
    for name, outs in texts.items():
        j = {"length": [float(len(t.split())) for t in outs]}
        if score is not None:
            j["rm_score"] = score([(p, [{"role": "assistant", "content": t}]) for p, t in zip(prompts, outs)])
        if objective is not None:
            j["objective"] = [float(objective(q, t)) for q, t in zip(user_turns, outs)]
        judged[name] = j
    first = policies[0]
    report = {"prompts": len(prompts), "baseline": first,
              "policies": evaluation.compare_policies(judged, first, WIN_RATES)}
    report["samples"] = [{"prompt": user_turns[i], **{n: texts[n][i] for n in texts}} for i in range(min(5, len(prompts)))]
    return report


def reward_accuracy(reward: str, data: str, split: str = "test") -> dict:
    """The reward model's accuracy and margin on the pairs of ``data`` (split ``split``),
    overall and per subset (the record's source file) when there are several.

    Returns:
        ``{"data": "NAME:VERSION", "split", "overall": {...}, "subsets": {name: {...}}}`` with
        ``{"accuracy": {"mean", "se", "n"}, "margin": {...}}`` values (ties skipped).
    """
    import reward_data

    from rlhf.resolve import resolve_preferences

    ref = resolve_preferences("--preferences", data, None, 0.05)
    records = [r for r in reward_data.read_split(ref, split) if not r.get("tie")]
    if not records:
        from rlhf.config import ConfigError

        raise ConfigError(f"--preferences {ref}: no pairs in split {split!r}")
    score = reward_scorer(reward)
    chosen = score([(r["prompt"], r["chosen"]) for r in records])
    rejected = score([(r["prompt"], r["rejected"]) for r in records])
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str((r.get("source") or {}).get("file", "all")), []).append(i)

    def stats(idx: list[int]) -> dict:
        return {"accuracy": evaluation.statistic([1.0 if chosen[i] > rejected[i] else 0.0 for i in idx]),
                "margin": evaluation.statistic([chosen[i] - rejected[i] for i in idx])}

    out = {"data": ref, "split": split, "overall": stats(list(range(len(records))))}
    if len(groups) > 1:
        out["subsets"] = {name: stats(idx) for name, idx in sorted(groups.items())}
    return out


def _fmt(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.4f} ± {v['se']:.4f}"


def main(argv: list[str]) -> int:
    """``rlhf eval`` (see the module docstring)."""
    from rlhf.generate import read_prompts

    parser = argparse.ArgumentParser(prog="rlhf eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", default=[],
                        help="policy reference (repeat; the first is the baseline of the win rates)")
    parser.add_argument("--prompts", help="prompts: a file with a 'prompt' column, .txt, or NAME[:VERSION] (its test split)")
    parser.add_argument("--reward", help="reward adapter (registry reference or directory)")
    parser.add_argument("--objective", help="module:attr, file.py:attr (task class, object or function) or builtin:NAME")
    parser.add_argument("--best-of", type=int, default=0, help="also a best-of-N baseline from the first policy")
    parser.add_argument("--preferences", help="reward-model accuracy on this preference data (NAME[:VERSION] or file)")
    parser.add_argument("--split", default="test", help="split of --preferences (default test)")
    parser.add_argument("--max-prompts", type=int, default=0, help="evaluate only the first N prompts (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="sampling engine: transformers generate (default) or vLLM (bash scripts/setup_vllm.sh)")
    parser.add_argument("--out", help="write the report as JSON here")
    add_home_option(parser)
    args = parser.parse_args(argv)
    use_home(args.home)
    report: dict = {}
    if args.preferences:
        if not args.reward:
            parser.error("--preferences needs --reward")
        report["reward_accuracy"] = acc = reward_accuracy(args.reward, args.preferences, args.split)
        print(f"reward model {args.reward} on {acc['data']} ({args.split}): accuracy {_fmt(acc['overall']['accuracy'])}, "
              f"margin {_fmt(acc['overall']['margin'])}, {acc['overall']['accuracy']['n']} pairs")
        for name, s in acc.get("subsets", {}).items():
            print(f"  {name}: accuracy {_fmt(s['accuracy'])}, margin {_fmt(s['margin'])}, {s['accuracy']['n']} pairs")
    if args.policy:
        if not args.prompts:
            parser.error("--policy needs --prompts")
        prompts = read_prompts(args.prompts)
        if args.max_prompts:
            prompts = prompts[: args.max_prompts]
        objective = load_objective(args.objective) if args.objective else None
        report["policies"] = rep = evaluate_policies(
            args.policy, prompts, reward=args.reward, objective=objective, best_of=args.best_of,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, engine=args.engine)
        print(f"{rep['prompts']} prompts; win rates are over {rep['baseline']} on the same prompts")
        cols = ("rm_score", "objective", "length", "win_rate_rm", "win_rate_objective")
        print("policy".ljust(40) + "".join(c.rjust(22) for c in cols))
        for name, e in rep["policies"].items():
            print(name[:40].ljust(40) + "".join(_fmt(e.get(c)).rjust(22) for c in cols))
    if not report:
        parser.error("give --policy ... --prompts, and/or --reward with --preferences")
    if args.out:
        out = Path(args.out)
        write_text(out, json.dumps(report, indent=2))
        print(f"report written to {out}", file=sys.stderr)
    return 0
