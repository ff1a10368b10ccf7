"""Old defaults against the safe defaults of issue 30, same seeds, on each embedded task.

Usage::

    python scripts/bench_safe_defaults.py                          # weak, synthetic, format; seed 0
    python scripts/bench_safe_defaults.py --tasks weak --seeds 0 1 2
    python scripts/bench_safe_defaults.py --table-only             # print what earlier runs left

Each (task, seed) is one run directory under ``--root`` (``runs/bench-safe/<task>-seed<s>``),
run twice with ``rlhf run``: the ``old`` arm, then the ``new`` arm. SFT and the reward model are
the same for both (the second run finds them cached), so the arms differ in PPO alone. Each
arm's ``summary.json`` is kept as ``summary-<arm>.json``; an arm whose file exists is not run
again, so an interrupted benchmark continues where it stopped.

The arms, as a user whose judge is kept outside the pipeline would run (issue 30): the task's
objective only measures, it never guides the watchdog.

* ``old``: ``ppo.safe_defaults=false`` and the watchdog off (before the held-out pairs judge, a
  run without an objective had no judge, so no watchdog).
* ``new``: ``ppo.safe_defaults=true`` (adaptive KL to a per-token target) and the watchdog on
  with the default judge, the policy's agreement with the reward model's held-out pairs
  (``ppo.watchdog_judge=pairs``, so the objective the embedded task has is not used).

The recipes are the tiny default's settings: ``pipelines/tiny.yaml`` (synthetic, and format
with ``task.name=format``) and ``pipelines/tiny-weak.yaml``. Runs use 2 CPU threads (``--threads``). The table: gold (judge) gain in standard errors of the difference,
gold SFT -> PPO, KL to SFT per response, KL per unit of gold gain, the reward model's accuracy
against the noiseless gold preference, RM score SFT -> PPO, the pairs judge's agreement SFT ->
PPO, whether the watchdog tripped, and each arm's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"synthetic": ("pipelines/tiny.yaml", []), "format": ("pipelines/tiny.yaml", ["task.name=format"]),
           "weak": ("pipelines/tiny-weak.yaml", []),
           "weak50": ("pipelines/tiny-weak.yaml", ["task.spurious_fraction=0.5"]),
           # the weak family's second member: the synthetic task with a tenth of its pairs
           "scarce": ("pipelines/tiny.yaml", ["task.num_pairs=600"])}
ARMS = {"old": ["reward.ensemble=1", "ppo.safe_defaults=false", 'ppo.watchdog="off"'],
        "new": ["ppo.watchdog_judge=pairs"]}


def run_arm(task: str, seed: int, arm: str, root: Path, threads: int = 2) -> dict | None:
    """Run one arm (unless its summary is kept already) and return its summary and wall time."""
    kept = summary_path(root, task, seed, arm)
    if kept.exists():
        return json.loads(kept.read_text())
    run_dir = kept.parent
    recipe, extra = RECIPES[task]
    cmd = [str(ROOT / ".venv/bin/rlhf"), "run", recipe, "--output-dir", str(run_dir), "register=false",
           f"seed={seed}", f"num_threads={threads}", *extra, *ARMS[arm]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLHF_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[bench] {task} seed {seed} {arm}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    log = run_dir.parent / f"{run_dir.name}-{arm}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    written = run_dir / "summary.json"
    blocked = done.returncode != 0 and written.exists() and json.loads(written.read_text()).get("ppo_blocked")
    if done.returncode != 0 and not blocked:
        print(f"[bench] {task} seed {seed} {arm}: failed (exit {done.returncode}), see {log}", flush=True)
        return None
    out = json.loads(written.read_text())  # a run the reward gate stopped before PPO is kept: its policy is SFT
    out["bench_wall_s"] = time.time() - t0
    out["bench_threads"] = threads
    kept.write_text(json.dumps(out, indent=1))
    return out


def summary_path(root: Path, task: str, seed: int, arm: str) -> Path:
    """Where an arm's summary is kept: arms that train the same reward model (the same
    ``reward.*`` overrides) share one run directory, so SFT and the reward model are trained
    once for them."""
    rm = "-".join(o.split("=", 1)[1] for o in ARMS[arm] if o.startswith("reward."))
    return root / (f"{task}-seed{seed}" + (f"-rm{rm}" if rm else "")) / f"summary-{arm}.json"


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[tuple[str, int, str, dict]]) -> str:
    """One markdown table of the arms' summaries."""
    head = ("| task | seed | arm | gold gain (s.e.) | gold SFT -> PPO | KL/response | KL per gold gain | "
            "RM acc vs gold | RM score SFT -> PPO | pairs judge SFT -> PPO | watchdog tripped | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task, seed, arm, s in rows:
        judge = (f"{_f(s.get('judge_sft'))} -> {_f(s.get('judge_ppo'))}" if s.get("judge") == "pairs" else "-")
        tripped = "-" if s.get("watchdog_tripped") is None else ("yes" if s["watchdog_tripped"] else "no")
        if s.get("ppo_blocked"):
            tripped = "PPO not run: the reward gate stopped it"
        lines.append(
            f"| {task} | {seed} | {arm} | {_f(s.get('gold_improvement_in_se'), '+.2f')} | "
            f"{_f(s.get('gold_reward_sft'))} -> {_f(s.get('gold_reward_ppo'))} | "
            f"{_f(s.get('kl_ppo_sft'), '.2f')} | {_f(s.get('kl_per_gold_gain'), '.1f')} | "
            f"{_f(s.get('rm_accuracy_gold'))} | {_f(s.get('reward_score_sft'))} -> {_f(s.get('reward_score_ppo'))} | "
            f"{judge} | {tripped} | {_f(s.get('bench_wall_s'), '.0f')} |")
    return "\n".join(lines)


def _mean_sd(vals: list[float], fmt: str) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return f"{format(mean, fmt)} ± {format(sd, fmt.lstrip('+'))}"


def aggregate(rows: list[tuple[str, int, str, dict]]) -> str:
    """Per task and arm, mean ± sd over the seeds (sample sd), and the worst seed's gold gain:
    the numbers of README's "Safe defaults" table. A run the reward gate stopped counts as a
    gain of 0 (its policy is the SFT policy)."""
    head = ("| task | arm | seeds | gold gain (s.e.), mean ± sd | worst seed | KL/response | KL per gold gain | "
            "RM acc vs gold | watchdog tripped |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for task, _, arm, s in rows:
        groups.setdefault((task, arm), []).append(s)
    for (task, arm), runs in groups.items():
        gains = [0.0 if r.get("ppo_blocked") else r.get("gold_improvement_in_se") for r in runs]
        gains = [g for g in gains if g is not None]
        ran = [r for r in runs if not r.get("ppo_blocked")]

        def vals(k):
            return [r[k] for r in ran if r.get(k) is not None]

        tripped = sum(bool(r.get("watchdog_tripped")) for r in ran)
        lines.append(
            f"| {task} | {arm} | {len(runs)} | {_mean_sd(gains, '+.2f')} | {_f(min(gains) if gains else None, '+.2f')} | "
            f"{_mean_sd(vals('kl_ppo_sft'), '.2f')} | {_mean_sd(vals('kl_per_gold_gain'), '.1f')} | "
            f"{_mean_sd([r['rm_accuracy_gold'] for r in runs if r.get('rm_accuracy_gold') is not None], '.3f')} | "
            + (f"{tripped} of {len(ran)} |" if ran and ran[0].get("watchdog_tripped") is not None else
               ("PPO not run (gate) |" if not ran else "- |")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["weak", "synthetic", "format"], choices=sorted(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--arms", nargs="+", default=["old", "new"],
                    help="arms to run: old, new, or NAME:key=value,key=value (the new arm's settings plus these "
                         "overrides, e.g. k2:ppo.ensemble_k=2)")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "bench-safe")
    ap.add_argument("--table-only", action="store_true", help="print the kept summaries, run nothing")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run (RLHF_NUM_THREADS; default 2)")
    ap.add_argument("--aggregate", action="store_true", help="also print mean ± sd over the seeds per task and arm")
    args = ap.parse_args(argv)
    for i, arm in enumerate(args.arms):
        if ":" in arm:
            name, overrides = arm.split(":", 1)
            ARMS[name] = ARMS["new"] + overrides.split(",")
            args.arms[i] = name
        elif arm not in ARMS:
            ap.error(f"--arms: unknown arm {arm!r} (old, new, or NAME:key=value,...)")
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            for arm in args.arms:
                kept = summary_path(args.root, task, seed, arm)
                s = (json.loads(kept.read_text()) if kept.exists() else None) if args.table_only else \
                    run_arm(task, seed, arm, args.root, args.threads)
                if s is not None:
                    rows.append((task, seed, arm, s))
    print(table(rows))
    if args.aggregate:
        print()
        print(aggregate(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
