"""The one entry point: ``rlhf <command>``. Thin: parses arguments and calls into the stages.

Commands:
  rlhf run RECIPE [--output-dir D] [--from STAGE] [--resume] [key=value ...]
  rlhf sft|reward|ppo --config FILE [key=value ...]    one stage alone
      both take  --launcher accelerate --accelerate-config FILE --num-processes N
      (re-runs the command under `accelerate launch`; see pipelines/accelerate/)
  rlhf data ...        preference-data ingestion (reward_data)
  rlhf registry ...    model registry
  rlhf dashboard [--port P] [--runs-root DIR]
  rlhf report RUN_DIR --out report.html
"""

from __future__ import annotations

import argparse
import os
import sys



def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                        help="accelerate: run the command on several processes via `accelerate launch`")
    parser.add_argument("--accelerate-config", help="accelerate config, e.g. pipelines/accelerate/ddp.yaml")
    parser.add_argument("--num-processes", type=int, help="processes to launch, over all machines (overrides the config's)")
    parser.add_argument("--num-machines", type=int, help="machines taking part; run the same command on each")
    parser.add_argument("--machine-rank", type=int, help="this machine's rank, 0..num-machines-1")
    parser.add_argument("--main-process-ip", help="address of machine 0 (the rendezvous host)")
    parser.add_argument("--main-process-port", type=int, help="rendezvous port on machine 0 (default 29500)")
    return parser


def _maybe_launch(cmd: str, argv: list[str]) -> tuple[int | None, list[str]]:
    """Strip the launcher options; with ``--launcher accelerate`` (outside a launched
    process) re-run ``rlhf CMD ...`` under accelerate launch and return its exit status."""
    args, rest = _launcher_parser().parse_known_args(argv)
    machine = (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
    if args.launcher == "none" and (args.accelerate_config or args.num_processes or any(v is not None for v in machine)):
        from rlhf.config import ConfigError

        raise ConfigError("--accelerate-config/--num-processes/--num-machines/--machine-rank/--main-process-* need "
                          "--launcher accelerate")
    if args.launcher != "accelerate" or os.environ.get("LOCAL_RANK") is not None:
        return None, rest  # single process, or already one of the launched processes
    from rlhf.launch import launch

    return launch([cmd, *rest], args.accelerate_config, args.num_processes, main_process_port=args.main_process_port,
                  num_machines=args.num_machines, machine_rank=args.machine_rank,
                  main_process_ip=args.main_process_ip), rest


def _stage_main(stage: str, argv: list[str]) -> int:
    import dataclasses
    import json

    from rlhf import distributed
    from rlhf.config import apply_overrides, from_dict, load_yaml
    from rlhf.stages import STAGES, run_stage

    parser = argparse.ArgumentParser(prog=f"rlhf {stage}", description=f"Run the {stage} stage alone.")
    parser.add_argument("--config", help="YAML file with the stage's settings (see rlhf/config.py)")
    parser.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)
    data = load_yaml(args.config) if args.config else {}
    apply_overrides(data, args.overrides)
    cfg = from_dict(STAGES[stage].config, data, prefix=stage)
    result = run_stage(stage, cfg, resume=args.resume)
    if distributed.is_main():
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def _run_main(argv: list[str]) -> int:
    from rlhf import distributed
    from rlhf.pipeline import Pipeline, plan, print_summary
    from rlhf.stages import STAGES

    parser = argparse.ArgumentParser(prog="rlhf run", description="Run a staged recipe: SFT -> reward -> PPO.",
                                     parents=[_launcher_parser()])
    parser.add_argument("recipe", help="pipelines/<recipe>.yaml")
    parser.add_argument("--output-dir", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--from", dest="from_stage", choices=list(STAGES), help="rerun from this stage on")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted stage from its last checkpoint")
    parser.add_argument("--validate-only", action="store_true", help="check the recipe and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. ppo.total_episodes=512")
    args = parser.parse_intermixed_args(argv)
    p = plan(args.recipe, args.output_dir, args.overrides)
    if args.validate_only:
        print(f"{args.recipe}: valid (run dir {p.run_dir})")
        return 0
    summary = Pipeline(p).run(from_stage=args.from_stage, resume=args.resume)
    if distributed.is_main():
        print_summary(summary, p.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--version":
        from rlhf import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    from rlhf.config import ConfigError
    from rlhf.stages import STAGES

    try:
        if cmd == "run" or cmd in STAGES:
            status, rest = _maybe_launch(cmd, rest)
            if status is not None:
                return status
        if cmd == "run":
            return _run_main(rest)
        if cmd in STAGES:
            return _stage_main(cmd, rest)
        if cmd == "data":
            from reward_data.cli import main as data_main

            return data_main(rest)
        if cmd == "registry":
            from rlhf.registry.cli import main as registry_main

            return registry_main(rest)
        if cmd == "dashboard":
            from rlhf.dashboard.cli import main as dash_main

            return dash_main(["serve", *rest])
        if cmd == "report":
            from rlhf.dashboard.cli import main as dash_main

            return dash_main(["report", *rest])
    except ConfigError as e:
        print(f"rlhf: config error: {e}", file=sys.stderr)
        return 2
    print(f"rlhf: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
