"""Fixtures of the dashboard tests: fake run directories, a served dashboard, a headless browser.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from rlhf.dashboard.server import make_server

from chromium import Chromium
from fake_runs import CHROMIUM, make_run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    logged = {"alpha": make_run(root, "alpha", 0.0), "beta": make_run(root, "beta", 0.5, finished=False)}
    (root / "not-a-run").mkdir()  # folders without pipeline.json are not listed
    return root, logged


@pytest.fixture
def server(runs_root):
    root, _ = runs_root
    srv = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    chrome = Chromium(tmp_path / "chrome-profile")
    yield chrome
    chrome.close()
