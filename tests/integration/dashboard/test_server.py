"""The dashboard's HTTP server: the JSON API, pages that need no network, 404s for unknown
runs and path tricks, and the Host check against DNS rebinding.
"""

from __future__ import annotations

import http.client
import json
import re
import threading

from rlhf.dashboard.server import make_server

from fake_runs import _get


def test_api_lists_runs_and_returns_logged_curves(server, runs_root):
    _, logged = runs_root
    status, body = _get(server.url + "api/runs")
    assert status == 200
    runs = json.loads(body)
    assert sorted(r["key"] for r in runs) == ["alpha", "beta"]
    assert {r["key"]: r["stages"]["ppo"] for r in runs} == {"alpha": "completed", "beta": "running"}

    status, body = _get(server.url + "api/run/alpha")
    assert status == 200
    run = json.loads(body)
    stages = {s["name"]: s for s in run["stages"]}
    assert list(stages) == ["sft", "reward", "ppo"]  # pipeline order, though pipeline.json sorts its keys
    for (stage, metric), (steps, values) in logged["alpha"]["curves"].items():
        assert stages[stage]["series"][metric] == {"step": steps, "value": values}, (stage, metric)
    assert len(stages["ppo"]["samples"]) == 12
    assert stages["ppo"]["samples"][0]["length"] == 3  # extra per-sample fields are kept
    assert run["problems"] == []


def test_served_pages_need_no_network(server):
    page = _get(server.url + "run/alpha")[1]
    assert '<script src="/static/plotly.min.js"></script>' in page
    assert not re.search(r'(src|href)="https?://', page)
    status, js = _get(server.url + "static/plotly.min.js")
    assert status == 200 and "Plotly" in js[:5000]


def test_unknown_runs_and_path_tricks_are_404(server):
    for path in ("run/nope", "run/..", "run/not-a-run", "api/run/%2e%2e", "compare?runs=alpha,nope", "elsewhere"):
        status, _ = _get(server.url + path)
        assert status == 404, path
    assert _get(server.url + "compare")[0] == 400


def _status_for_host(srv, host: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    connection.putrequest("GET", "/api/runs", skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_host_header_is_checked_against_dns_rebinding(runs_root):
    root, _ = runs_root
    srv = make_server(root, "127.0.0.1", 0, allowed_hosts=["dash.example.org"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST", "dash.example.org:80"):
            assert _status_for_host(srv, host) == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", None):
            assert _status_for_host(srv, host) == 403, host
    finally:
        srv.shutdown()
        srv.server_close()
    anyone = make_server(root, "127.0.0.1", 0, allowed_hosts=["*"])  # explicitly configured
    threading.Thread(target=anyone.serve_forever, daemon=True).start()
    try:
        assert _status_for_host(anyone, "evil.example") == 200
    finally:
        anyone.shutdown()
        anyone.server_close()
