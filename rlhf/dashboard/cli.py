"""Command line for the dashboard: ``serve`` a local web page, or write one run's ``report``.

The main CLI maps ``rlhf dashboard ...`` to ``main(["serve", ...])`` and
``rlhf report RUN --out F`` to ``main(["report", RUN, "--out", F])``; ``python -m
rlhf.dashboard`` runs this directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main", "write_report"]


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write one run's page as a single self-contained HTML file (plotly.js inlined).

    The file is written to a temporary name beside ``out`` and renamed into place, so a
    reader never sees half a report.

    Raises:
        FileNotFoundError: if ``run_dir`` has no pipeline.json.
    """
    from rlhf.dashboard.data import load_run
    from rlhf.dashboard.render import render_run

    out = Path(out)
    page = render_run(load_run(run_dir), standalone=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf dashboard", description="Browse local rlhf pipeline runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a web page over the runs under --runs-root (no network needed)")
    serve.add_argument("--port", type=int, default=8765, help="TCP port (0 picks a free one; default 8765)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--runs-root", default="runs", help="folder whose subfolders are pipeline runs (default ./runs)")
    report = commands.add_parser("report", help="write one run as a self-contained HTML file to share")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run directory (holds pipeline.json)")
    report.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the dashboard CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "report":
        run_dir = Path(args.run_dir)
        if not (run_dir / "pipeline.json").is_file():
            print(f"rlhf report: {run_dir / 'pipeline.json'} not found; pass a pipeline run directory", file=sys.stderr)
            return 2
        out = write_report(run_dir, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained)")
        return 0

    from rlhf.dashboard.data import list_runs
    from rlhf.dashboard.server import make_server

    runs_root = Path(args.runs_root)
    if not runs_root.is_dir():
        print(f"rlhf dashboard: note: {runs_root} does not exist yet; the page lists runs once it does", file=sys.stderr)
    try:
        server = make_server(runs_root, args.host, args.port)
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


if __name__ == "__main__":
    sys.exit(main())
