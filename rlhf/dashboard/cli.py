"""Command line for the dashboard: ``serve`` a local web page, or write one run's ``report``.

The main CLI maps ``rlhf dashboard ...`` to ``main(["serve", ...])`` and ``rlhf report RUN
--out F`` to ``main(["report", RUN, "--out", F])``; :func:`serve_main` and
:func:`report_main` are the same two commands without the leading word. Their usage lines
read ``rlhf dashboard`` and ``rlhf report``, the commands a user types. ``python -m
rlhf.dashboard serve|report`` runs this directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.atomic import write_text
from rlhf.paths import add_home_option, current_umask, use_home

__all__ = ["main", "report_main", "serve_main", "write_report"]


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write one run's page as a single self-contained HTML file (plotly.js inlined).

    The file is written to a temporary name beside ``out`` and renamed into place, so a
    reader never sees half a report. Its permissions follow the user's umask like any file
    the user creates (a temporary file starts private, 0600).

    Raises:
        FileNotFoundError: if ``run_dir`` has no pipeline.json.
        IsADirectoryError: if ``out`` is a directory.
    """
    from rlhf.dashboard.data import load_run
    from rlhf.dashboard.render import render_run

    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a directory; pass a file name such as {out / 'report.html'}")
    page = render_run(load_run(run_dir), standalone=True)
    write_text(out, page, mode=0o666 & ~current_umask())
    return out


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf dashboard",
        description="Serve a local web page over the pipeline runs under --runs-root (no network needed).",
    )
    parser.add_argument("--port", type=int, default=8765, help="TCP port (0 picks a free one; default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--runs-root", default="runs", help="folder whose subfolders are pipeline runs (default ./runs)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests addressed to NAME (repeatable); by default only localhost, 127.0.0.1, "
        "[::1] and the bound address are answered, which stops DNS-rebinding pages from reading runs "
        "('*' answers any name: only behind another access control)",
    )
    add_home_option(parser)
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf report", description="Write one pipeline run as a self-contained HTML file to share."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run directory (holds pipeline.json)")
    parser.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    add_home_option(parser)
    return parser


def report_main(argv: list[str] | None = None) -> int:
    """``rlhf report RUN_DIR [--out FILE]``; returns the process exit code."""
    args = _report_parser().parse_args(argv)
    use_home(args.home)
    run_dir = Path(args.run_dir)
    if not (run_dir / "pipeline.json").is_file():
        print(f"rlhf report: {run_dir / 'pipeline.json'} not found; pass a pipeline run directory", file=sys.stderr)
        return 2
    try:
        out = write_report(run_dir, args.out)
    except OSError as err:
        print(f"rlhf report: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained)")
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """``rlhf dashboard [--port P] [--runs-root DIR] ...``; returns the process exit code."""
    args = _serve_parser().parse_args(argv)
    use_home(args.home)
    from rlhf.dashboard.data import list_runs
    from rlhf.dashboard.server import make_server

    runs_root = Path(args.runs_root)
    if not runs_root.is_dir():
        print(f"rlhf dashboard: note: {runs_root} does not exist yet; the page lists runs once it does", file=sys.stderr)
    try:
        server = make_server(runs_root, args.host, args.port, allowed_hosts=args.allow_host)
    except OSError as err:
        print(f"rlhf dashboard: cannot listen on {args.host}:{args.port} ({err}); try --port 0", file=sys.stderr)
        return 1
    print(f"rlhf dashboard: {len(list_runs(runs_root))} run(s) under {runs_root} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


_COMMANDS = {"serve": serve_main, "report": report_main}


def main(argv: list[str] | None = None) -> int:
    """``serve ...`` or ``report ...``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        print(
            "usage: python -m rlhf.dashboard {serve,report} ...\n"
            "  serve   serve a web page over local pipeline runs (rlhf dashboard)\n"
            "  report  write one run as a self-contained HTML file (rlhf report)",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "serve" and rest[:1] == ["serve"]:
        rest = rest[1:]  # `rlhf dashboard serve`: the main CLI already added "serve"
    return _COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
