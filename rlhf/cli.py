"""The one entry point: ``rlhf <command>``. Thin: parses arguments and calls into the stages.

Each command has its own ``--help``; the stage commands list every config key (type,
default, help) generated from the dataclasses in rlhf/config.py, and ``rlhf config show``
prints a stage's or a recipe's fully resolved config. ``--help`` never starts anything.

The console shows stage headers, progress and the final table; the trainers' per-step
numbers go to the tracker and ``<run_dir>/<stage>/log.txt`` (``--verbose`` prints them too).
A broken pipe (``rlhf data show X | head``), Ctrl-C and SIGTERM (``scancel``, ``docker
stop``) end quietly with the conventional exit status, 141, 130 and 143; SIGTERM is handled
like Ctrl-C: the stage is marked interrupted and the run directory's lock released.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import types
import typing
from pathlib import Path

from rlhf.paths import add_home_option, use_home

from rlhf.stages import STAGES

#: Every command with its one-line description, in the order ``rlhf --help`` lists them; one
#: command per stage of the stage table (``rlhf sft``, ``rlhf ppo``...), after ``run``.
COMMANDS = {
    "run": "run a staged recipe: SFT -> reward model -> PPO (cached, resumable)",
    **{name: row.help for name, row in STAGES.items()},
    "config": "print a stage's or a recipe's fully resolved config (config show STAGE|RECIPE)",
    "data": "ingest and inspect preference data (the versioned data store)",
    "registry": "list, inspect, export and tag models in the model registry",
    "generate": "sample completions from a trained policy (registry ref, adapter or model directory)",
    "chat": "talk to a trained policy (one user turn per line)",
    "eval": "score policies (reward model / objective, win rates, best-of-n); reward-model accuracy",
    "dashboard": "serve a local web page over pipeline runs",
    "report": "write one run as a self-contained HTML report",
    "env": "print versions, devices and paths (paste it into a bug report)",
}

STAGE_NAMES = tuple(STAGES)  # the table imports no stage module (and no torch): --help stays fast

#: The gated stage of the table (the one the reward gate guards: PPO), whose override ``rlhf run
#: --help`` shows as a recipe key.
_RUN_EXAMPLE_STAGE = next(name for name, row in STAGES.items() if row.gated)

#: The override shown in each command's --help (tests/unit/test_cli.py applies every one).
OVERRIDE_EXAMPLES = {**{name: row.example for name, row in STAGES.items()},
                     "run": f"{_RUN_EXAMPLE_STAGE}.{STAGES[_RUN_EXAMPLE_STAGE].example}"}


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: rlhf <command> [options]",
        "",
        "Staged RLHF: SFT -> Bradley-Terry reward model -> PPO, with a model registry and dashboards.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this message and exit",
        "  --version   print the version and exit",
        "",
        "`rlhf <command> --help` shows a command's options; e.g. `rlhf run pipelines/tiny.yaml`.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# config keys in --help, generated from the dataclasses


def _type_text(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _yaml_value(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def config_keys(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, help)`` for every leaf field of config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, prefix=f"{key}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default_text = "(required)" if default is dataclasses.MISSING else _yaml_value(default)
        rows.append((key, _type_text(tp), default_text, f.metadata.get("help", "")))
    return rows


def config_help(cls, title: str) -> str:
    """The config-key section of a command's --help, then the deprecated names it still accepts."""
    from rlhf.config import deprecated_keys

    lines = [title]
    for key, tp, default, text in config_keys(cls):
        lines.append(f"  {key}  ({tp}, default {default})")
        lines += textwrap.wrap(text, width=88, initial_indent="      ", subsequent_indent="      ")
    if renamed := deprecated_keys(cls):
        lines += ["", "deprecated key names (still accepted, with a FutureWarning naming the new key):"]
        lines += [f"  {old} -> {new}" for old, new in renamed]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# options shared by the commands that train


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                       help="accelerate: run the command on several processes via `accelerate launch`")
    group.add_argument("--accelerate-config", help="accelerate config, e.g. pipelines/accelerate/ddp.yaml")
    group.add_argument("--num-processes", type=int, help="processes to launch, over all machines (overrides the config's)")
    group.add_argument("--num-machines", type=int, help="machines taking part; run the same command on each")
    group.add_argument("--machine-rank", type=int, help="this machine's rank, 0..num-machines-1")
    group.add_argument("--main-process-ip", help="address of machine 0 (the rendezvous host)")
    group.add_argument("--main-process-port", type=int, help="rendezvous port on machine 0 (default 29500)")
    return parser


def _console_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("console")
    group.add_argument("--verbose", action="store_true",
                       help="also print every logged step (the trainers' dicts) and third-party progress "
                            "bars; without it the steps go to <run_dir>/<stage>/log.txt only")
    group.add_argument("--progress-interval", type=float, metavar="SECONDS",
                       help="seconds between progress records when the console is not a terminal (file, pipe, "
                            "batch job); default $RLHF_PROGRESS_INTERVAL, then 30")
    add_home_option(group)
    return parser


def _setup_console(verbose: bool, progress_interval: float | None, home: str | None = None) -> None:
    """Quiet the third-party printers unless ``--verbose``; pass the console settings on to
    the stages (and to processes started by ``accelerate launch``) through the environment."""
    from rlhf.config import ConfigError
    from rlhf.tracking import filter_third_party_noise, progress_interval as check_interval

    use_home(home)
    # stage headers (stdout) and progress records (stderr) stay in order in a batch job's log
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if progress_interval is not None:
        try:
            os.environ["RLHF_PROGRESS_INTERVAL"] = str(check_interval(progress_interval))
        except ValueError as e:
            raise ConfigError(f"--progress-interval: {e}") from None
    if verbose:
        os.environ["RLHF_VERBOSE"] = "1"
        return
    filter_third_party_noise()
    # datasets' "Generating train split" / "Map" bars and transformers' "Loading weights"
    # bars: one run prints dozens of them, the stage's own progress line says enough.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


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


def _wants_help(argv: list[str]) -> bool:
    # overrides are key=value, so a bare -h/--help token is always the option
    return any(a in ("-h", "--help") for a in argv)


# ----------------------------------------------------------------------------------------
# commands


def _stage_parser(stage: str) -> argparse.ArgumentParser:
    cls = STAGES[stage].config
    parser = argparse.ArgumentParser(
        prog=f"rlhf {stage}", description=f"{STAGES[stage].help.capitalize()}. {cls.__doc__}",
        parents=[_launcher_parser(), _console_parser()], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(cls, "config keys (in --config FILE, or as key.sub=value overrides):"),
    )
    parser.add_argument("--config", help="YAML file with the stage's settings (keys below)")
    parser.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"overrides, e.g. {STAGES[stage].example}")
    return parser


def _stage_main(stage: str, argv: list[str]) -> int:
    import json

    args = _stage_parser(stage).parse_intermixed_args(argv)
    _setup_console(args.verbose, args.progress_interval, args.home)
    from rlhf import distributed
    from rlhf.config import apply_overrides, from_dict, load_yaml
    from rlhf.stages import run_stage

    data = load_yaml(args.config) if args.config else {}
    apply_overrides(data, args.overrides)
    cfg = from_dict(STAGES[stage].config, data, prefix=stage)
    if distributed.is_main():  # stderr, with the progress: stdout is the result's JSON alone
        print(f"[{stage}] running", file=sys.stderr)
    result = run_stage(stage, cfg, resume=args.resume)
    if distributed.is_main():
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def _run_parser() -> argparse.ArgumentParser:
    from rlhf.config import PipelineConfig

    parser = argparse.ArgumentParser(
        prog="rlhf run", description="Run a staged recipe: SFT -> reward model -> PPO. A stage whose config and "
        "inputs did not change since its last completed run is skipped.",
        parents=[_launcher_parser(), _console_parser()], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(PipelineConfig, "recipe keys (in RECIPE, or as key.sub=value overrides):") + "\n"
        + "\n".join(f"  {name}.*  (the keys of `rlhf {name} --help`)" for name in STAGES),
    )
    parser.add_argument("recipe", help="pipelines/<recipe>.yaml")
    parser.add_argument("--output-dir", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--from", dest="from_stage", choices=list(STAGES), help="rerun from this stage on")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted stage from its last checkpoint")
    parser.add_argument("--validate-only", action="store_true", help="check the recipe and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"overrides, e.g. {OVERRIDE_EXAMPLES['run']}")
    return parser


def _run_main(argv: list[str]) -> int:
    args = _run_parser().parse_intermixed_args(argv)
    _setup_console(args.verbose, args.progress_interval, args.home)
    from rlhf import distributed
    from rlhf.pipeline import Pipeline, plan, print_summary

    p = plan(args.recipe, args.output_dir, args.overrides, import_task=not args.validate_only)
    if args.validate_only:
        note = _unimported_note(p)
        print(f"{args.recipe}: valid (run dir {p.run_dir})" + (f"; {note}" if note else ""))
        return 0
    summary = Pipeline(p).run(from_stage=args.from_stage, resume=args.resume)
    if distributed.is_main():
        print_summary(summary, p.run_dir)
    return 0


def _config_main(argv: list[str]) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="rlhf config", description="Inspect configuration.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{show}")
    show = sub.add_parser(
        "show", prog="rlhf config show", help="print a stage's or a recipe's fully resolved config as YAML",
        description="Print the fully resolved config as YAML: a stage's defaults (a stage of the table) with "
        "--config and overrides applied, or a recipe with every stage's config as the pipeline builds it.",
    )
    show.add_argument("target", metavar="STAGE|RECIPE",
                      help=f"a stage ({', '.join(STAGES)}); or a recipe file (pipelines/tiny.yaml, or just tiny)")
    show.add_argument("--config", help="(stages) YAML file with the stage's settings")
    show.add_argument("--output-dir", help="(recipes) run directory the paths are resolved against")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, as for run or the stage")
    add_home_option(show)
    if argv[:1] != ["show"]:
        parser.parse_args(argv)  # --help, or a usage error naming the choices; both exit
    args = show.parse_intermixed_args(argv[1:])  # (argparse cannot intermix through subparsers)
    use_home(args.home)
    from rlhf.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

    if args.target in STAGES:
        data = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
        resolved = to_dict(from_dict(STAGES[args.target].config, data, prefix=args.target))
    else:
        from rlhf.pipeline import plan

        recipe = Path(args.target)
        if not recipe.exists() and not recipe.suffix and Path("pipelines", f"{args.target}.yaml").is_file():
            recipe = Path("pipelines", f"{args.target}.yaml")
        if not recipe.is_file():
            raise ConfigError(f"config show: {args.target!r} is neither a stage ({', '.join(STAGES)}) "
                              "nor a recipe file")
        p = plan(recipe, args.output_dir, args.overrides, check_inputs=False, import_task=False)
        top = to_dict(p.pipeline)
        resolved = {**top, "run_dir": str(p.run_dir), **{s: to_dict(cfg) for s, cfg in p.configs.items()}}
        note = _unimported_note(p)
        if note:  # a YAML comment: the output still parses
            sys.stdout.write(f"# {note}; the task file paths below assume it supplies every file\n")
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
    return 0


def _unimported_note(p) -> str:
    """For a recipe whose task.module was checked but not run (validating or showing it)."""
    module = p.pipeline.task.module
    if not module:
        return ""
    return f"task.module {module} not imported (a recipe naming a module is code: it runs with the pipeline)"


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from rlhf import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    from rlhf.config import ConfigError

    try:
        if (cmd == "run" or cmd in STAGES) and not _wants_help(rest):
            status, rest = _maybe_launch(cmd, rest)
            if status is not None:
                return status
        if cmd == "run":
            return _run_main(rest)
        if cmd in STAGES:
            return _stage_main(cmd, rest)
        if cmd == "config":
            return _config_main(rest)
        if cmd == "data":
            from reward_data.cli import main as data_main

            return data_main(rest)
        if cmd == "registry":
            from rlhf.registry.cli import main as registry_main

            return registry_main(rest)
        if cmd == "dashboard":
            from rlhf.dashboard.cli import main as dash_main

            return dash_main(["serve", *rest])
        if cmd in ("generate", "chat"):
            if not _wants_help(rest):  # no third-party bars or load reports around the completions
                _setup_console(False, None)
            from rlhf.generate import chat_main, generate_main

            return generate_main(rest) if cmd == "generate" else chat_main(rest)
        if cmd == "eval":
            if not _wants_help(rest):
                _setup_console(False, None)
            from rlhf.evaluate import main as eval_main

            return eval_main(rest)
        if cmd == "env":
            from rlhf.envinfo import main as env_main

            return env_main(rest)
        if cmd == "report":
            from rlhf.dashboard.cli import main as dash_main

            return dash_main(["report", *rest])
    except ConfigError as e:
        print(f"rlhf {cmd}: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # a registry that cannot be used (an emptied or damaged database): one line with the
        # recovery hint, as the registry commands print it. (Only a loaded registry raises one.)
        entry = sys.modules.get("rlhf.registry.entry")
        if entry is None or not isinstance(e, entry.RegistryError):
            raise
        print(f"rlhf {cmd}: registry error: {e}", file=sys.stderr)
        return 1
    print(f"rlhf: unknown command {cmd!r}\n\n{_top_help()}", file=sys.stderr)
    return 2


def _one_line_warning(default):
    """A ``warnings.formatwarning`` that prints the project's own warnings (raised in rlhf/ or
    reward_data/: a small split, pairs cut for length, a deprecated key) as one line,
    ``warning: <message>``, without the source path and line Python adds; other libraries'
    warnings keep ``default``'s format."""
    import reward_data

    ours = (str(Path(__file__).resolve().parent) + os.sep, str(Path(reward_data.__file__).resolve().parent) + os.sep)

    def fmt(message, category, filename, lineno, line=None):
        if str(filename).startswith(ours):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return fmt


def main(argv: list[str] | None = None) -> int:
    """Run ``rlhf ARGV``; returns the exit status (argparse's exits included, so tests can call it)."""
    import signal
    import threading

    from rlhf.runs import Terminated, handle_sigterm

    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning(default_format)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        handle_sigterm()
    try:
        try:
            status = _dispatch(argv)
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            if not (e.code is None or isinstance(e.code, int)):
                raise
            status = e.code or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except Terminated:
        print("\nrlhf: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        # Ctrl-C: no traceback; 128 + SIGINT, as shells report it
        print("\nrlhf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `rlhf ... | head` closed our stdout: stop quietly, 128 + SIGPIPE as shells report it;
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        warnings.formatwarning = default_format
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
