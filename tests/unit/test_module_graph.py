"""The module graph of rlhf and reward_data: no import circles, reward_data stands alone, and
imports go down the layers below (at most two exceptions). Every import counts, also those
inside functions; imports for type checkers only (under ``if TYPE_CHECKING:``) do not."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first; a module may import its own layer and those below. A module belongs to the
# first entry that is it or a package above it.
LAYERS = [
    ["reward_data"],
    ["rlhf.paths", "rlhf.atomic", "rlhf.estimators", "rlhf.summary", "rlhf.config", "rlhf.distributed", "rlhf.ppo",
     "rlhf.checkpoint", "rlhf.runs", "rlhf.launch", "rlhf"],
    ["rlhf.models", "rlhf.adapters", "rlhf.fsdp", "rlhf.tracking", "rlhf.generation", "rlhf.generation_vllm",
     "rlhf.registry",
     "rlhf.tasks", "rlhf.resolve", "rlhf.data", "rlhf.scoring", "rlhf.evaluation", "rlhf.update", "rlhf.watchdog", "rlhf.judge",
     "rlhf.reward_sources"],
    ["rlhf.stages", "rlhf.evaluate", "rlhf.generate"],
    # the commands: entry points may import anything
    ["rlhf.pipeline", "rlhf.dashboard", "rlhf.envinfo", "rlhf.cli", "rlhf.__main__", "rlhf.registry.__main__"],
]
MAX_UPWARD = 2


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("rlhf", "reward_data"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imported(path: Path, type_checking: bool) -> list[str]:
    """The dotted names ``path`` imports (``from a import b``: ``a.b``), with or without those
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _graph(type_checking: bool = False) -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {mod: {t for t in map(known, _imported(path, type_checking)) if t is not None and t != mod}
            for mod, path in mods.items()}


def _layer(mod: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (mod == entry or mod.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    assert best is not None, f"{mod} is in no layer of LAYERS: place it"
    return best[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_reward_data_depends_on_nothing_above_it():
    assert {(m, t) for m, ts in _graph().items() if m.startswith("reward_data") for t in ts
            if not t.startswith("reward_data")} == set()


def test_imports_go_down_the_layers_with_at_most_two_exceptions():
    upward = sorted((m, t) for m, ts in _graph().items() for t in ts if _layer(t) > _layer(m))
    assert len(upward) <= MAX_UPWARD, upward


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checks above would fail on a graph that breaks them."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _layer("rlhf.ppo.losses") < _layer("rlhf.stages.ppo") < _layer("rlhf.cli")


def test_only_the_stage_table_imports_stage_modules():
    """A stage module (rlhf/stages/<stage>.py) is a recipe, not a library: the stage table
    (rlhf/stages/__init__.py) alone imports it; what stages share lives in rlhf/stages/common.py
    or in the library below (generation, scoring, evaluation, estimators)."""
    stage_modules = {f"rlhf.stages.{p.stem}" for p in (ROOT / "rlhf" / "stages").glob("*.py")
                     if p.stem not in ("__init__", "common")}
    importers = {(m, t) for m, ts in _graph().items() for t in ts if t in stage_modules and m != "rlhf.stages"}
    assert importers == set()


def test_the_ppo_stage_stays_a_recipe():
    """rlhf/stages/ppo.py holds the loop; sampling, scoring, evaluation and the estimators
    live below it. 700 lines is the budget the split was made for."""
    assert len((ROOT / "rlhf" / "stages" / "ppo.py").read_text().splitlines()) <= 700


#: Scripts that time or check the PPO stage's own update step (sample, train_update, the
#: update epochs): they call the stage's functions, which no lower module has.
_SCRIPTS_OF_THE_PPO_STEP = {"bench_ppo.py", "_gpu_check.py"}


def _ppo_stage_importers(paths: dict[str, Path]) -> set[str]:
    return {name for name, path in paths.items()
            if any(n == "rlhf.stages.ppo" or n.startswith("rlhf.stages.ppo.") for n in _imported(path, True))}


def test_nothing_outside_the_stages_imports_the_ppo_stage():
    """The PPO stage is a recipe: no module outside rlhf/stages/ imports it, not even for type
    checkers (its setup and optimization types live in rlhf/ppo/state.py), and no script but
    those that exercise its update step."""
    outside = {m: p for m, p in _modules().items() if not m.startswith("rlhf.stages")}
    assert _ppo_stage_importers(outside) == set()
    scripts = {p.name: p for p in (ROOT / "scripts").glob("*.py")}
    assert _ppo_stage_importers(scripts) == _SCRIPTS_OF_THE_PPO_STEP
