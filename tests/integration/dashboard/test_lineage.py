"""Lineage on the run page: drawn as a graph, read from the registry when it is there.
"""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.data import load_run

from fake_runs import make_run, _get


def test_lineage_is_drawn_as_a_graph(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    svg = re.search(r"<svg class=\"lineage\".*?</svg>", page, re.S).group(0)
    nodes = set(re.findall(r'<g class="node node-[a-z]+" data-id="([^"]+)"', svg))
    refs = logged["alpha"]["refs"]
    assert nodes == {*refs.values(), "stage:sft", "stage:reward", "stage:ppo"}
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', svg))
    assert edges == {
        (refs["base"], "stage:sft"), ("stage:sft", refs["sft"]),
        (refs["base"], "stage:reward"), (refs["sft"], "stage:reward"), (refs["pairs"], "stage:reward"),
        ("stage:reward", refs["reward"]),
        (refs["base"], "stage:ppo"), (refs["sft"], "stage:ppo"), (refs["reward"], "stage:ppo"),
        ("stage:ppo", refs["policy"]), ("stage:ppo", refs["value"]),
    }
    # Arrows point forward: every edge goes to a later column.
    columns = {n: float(x) for n, x in re.findall(r'data-id="([^"]+)" transform="translate\(([\d.]+),', svg)}
    assert all(columns[a] < columns[b] for a, b in edges)


def test_lineage_comes_from_the_registry_when_available(tmp_path, monkeypatch):
    home = tmp_path / "reg"
    home.mkdir()
    make_run(tmp_path / "runs", "gamma", 0.0, registry_home=str(home))
    calls = []

    class FakeRegistry:
        @classmethod
        def open(cls, home=None):
            calls.append(("open", home))
            return cls()

        def lineage(self, ref):
            if ref == "pairs:1":
                raise KeyError(ref)
            # The base model came from a hub snapshot the run itself does not name.
            return {"ref": ref, "kind": "adapter", "ancestors": [
                {"relation": "base", "ref": "tiny-base:1", "kind": "base",
                 "ancestors": [{"relation": "parent", "ref": "hub-snapshot:3", "kind": "base", "ancestors": []}]}]}

    monkeypatch.setitem(sys.modules, "rlhf.registry", types.SimpleNamespace(Registry=FakeRegistry))
    run = load_run(tmp_path / "runs" / "gamma")
    assert calls == [("open", str(home))]
    assert run.lineage["gamma-policy:1"]["ancestors"][0]["ref"] == "tiny-base:1"
    assert "pairs:1" not in run.lineage and "pairs:1" in run.lineage_note
    out = tmp_path / "r.html"
    assert dashboard_main(["report", str(tmp_path / "runs" / "gamma"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "lineage of <code>gamma-policy:1</code>" in page  # raw records, folded under the graph
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)" data-relation="([^"]+)"', page))
    assert ("hub-snapshot:3", "tiny-base:1", "parent") in edges  # an ancestor the run does not name
    assert ("tiny-base:1", "gamma-policy:1", "base") not in edges  # already drawn through the stages


def test_lineage_from_the_real_registry(tmp_path):
    registry_module = pytest.importorskip("rlhf.registry")
    from safetensors.torch import save_file
    import torch

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")
    home = tmp_path / "home"
    registry = registry_module.Registry.open(home=home)
    base = registry.register_base("tiny", str(base_dir))
    run_ref = registry.start_run("sft", {"lr": 1e-4}, inputs=[base.ref])
    registry.finish_run(run_ref, "completed", {"loss": 1.0})
    registry.close()

    run_dir = tmp_path / "runs" / "real"
    run_dir.mkdir(parents=True)
    stages = {"sft": {"status": "completed", "inputs": {"base": base.ref}, "outputs": {"run": run_ref}}}
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "real", "registry_home": str(home), "stages": stages}))
    run = load_run(run_dir)
    assert run.lineage_note is None
    descendants = run.lineage[base.ref]["descendants"]
    assert [node["ref"] for node in descendants] == [run_ref]
    out = tmp_path / "real.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert f"lineage of <code>{base.ref}</code>" in page
    assert (base.ref, "stage:sft") in set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', page))
