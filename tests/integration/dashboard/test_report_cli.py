"""`rlhf report` and `rlhf dashboard`: one self-contained HTML file (with the user's umask),
usage lines, and the server run as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.render import plotly_js

from fake_runs import REPO, _get, _chart_specs, _chart_divs, _line


def test_report_is_one_self_contained_file(runs_root, tmp_path, capsys):
    root, logged = runs_root
    out = tmp_path / "share" / "report.html"
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert f"<script>{plotly_js()}</script>" in page  # plotly.js is inlined, whole
    # Outside the plotly bundle (whose own strings name its website) nothing points elsewhere.
    own = page.replace(plotly_js(), "")
    assert "<script src=" not in own and not re.search(r'(src|href)="https?://', own)
    assert "/static/" not in own and 'href="/"' not in own
    specs = {s["id"]: s for s in _chart_specs(page)}
    (eval_loss,) = [specs[c] for c, (_, _, k) in _chart_divs(page).items() if k == "sft-eval_loss"]
    assert _line(eval_loss, "beta-name")["y"] == logged["beta"]["curves"][("sft", "eval_loss")][1]
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    assert dashboard_main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "pipeline.json not found" in capsys.readouterr().err
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out.parent)]) == 1
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_report_follows_the_umask(runs_root, tmp_path, umask):
    root, _ = runs_root
    out = tmp_path / f"report-{umask:o}.html"
    old = os.umask(umask)
    try:
        assert dashboard_main(["report", str(root / "alpha"), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_usage_lines_match_the_command_typed(capsys):
    from rlhf.cli import main as rlhf_main

    for argv, usage in ((["dashboard", "--help"], "usage: rlhf dashboard "), (["report", "--help"], "usage: rlhf report ")):
        try:  # the CLI returns argparse's exit status (0 for --help) instead of raising it
            code = rlhf_main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 0
        out = capsys.readouterr().out
        assert out.startswith(usage), out
        assert "--runs-root" in out if argv[0] == "dashboard" else "--out" in out


def test_cli_serve_subprocess(runs_root):
    root, _ = runs_root
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "dashboard", "serve", "--port", "0", "--runs-root", str(root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert "2 run(s)" in line
        status, body = _get(match.group(1) + "api/runs")
        assert status == 200 and len(json.loads(body)) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
