"""The lineage of a run as a graph: registry refs and stages as boxes, arrows for "was made from".

Edges come from pipeline.json (each stage's input refs -> the stage -> its output refs) and,
when the model registry was readable, from its lineage records for ancestors the run itself
does not name (e.g. where a dataset came from). The graph is laid out in columns by longest
path from the sources and drawn as inline SVG: no script, no network, readable in the
shared report file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from rlhf.dashboard.data import RunData

__all__ = ["Graph", "lineage_graph", "render_svg"]

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 180, 44, 46, 18, 12


@dataclass
class Graph:
    """Nodes and directed edges (source -> what was made from it)."""

    nodes: dict[str, dict[str, str]] = field(
        default_factory=dict, metadata={"help": "id -> {'label', 'kind' ('stage'|'artifact'), 'detail'}"}
    )
    edges: list[tuple[str, str, str]] = field(default_factory=list, metadata={"help": "(from id, to id, relation)"})

    def add_node(self, node_id: str, label: str, kind: str, detail: str = "") -> None:
        node = self.nodes.setdefault(node_id, {"label": label, "kind": kind, "detail": detail})
        if detail and not node["detail"]:
            node["detail"] = detail

    def add_edge(self, source: str, target: str, relation: str) -> None:
        if source != target and all((s, t) != (source, target) for s, t, _ in self.edges):
            self.edges.append((source, target, relation))


def lineage_graph(run: RunData) -> Graph:
    """Build the run's lineage graph from pipeline.json refs and registry lineage records."""
    graph = Graph()
    stage_of_run: dict[str, str] = {}
    for stage in run.stages:
        if not stage.inputs and not stage.outputs:
            continue
        stage_id = f"stage:{stage.name}"
        run_ref = stage.run if isinstance(stage.run, str) else ""
        if run_ref:
            stage_of_run[run_ref] = stage_id
        graph.add_node(stage_id, stage.name, "stage", f"stage {stage.name}, {stage.status}" + (f", {run_ref}" if run_ref else ""))
        inputs = {ref for ref in stage.inputs.values() if isinstance(ref, str)}
        for role, ref in stage.inputs.items():
            if isinstance(ref, str):
                graph.add_node(ref, ref, "artifact", role)
                graph.add_edge(ref, stage_id, "input")
        for role, ref in stage.outputs.items():
            # A stage that registers a dataset it also reads names it on both sides; it is an input.
            if isinstance(ref, str) and ref not in inputs:
                graph.add_node(ref, ref, "artifact", f"{role} from {stage.name}")
                graph.add_edge(stage_id, ref, "output")
    for ref, record in run.lineage.items():
        if isinstance(record, dict):
            _add_ancestors(graph, ref, record.get("ancestors"), stage_of_run, depth=0)
    return graph


def _add_ancestors(graph: Graph, child: str, ancestors: Any, stage_of_run: dict[str, str], depth: int) -> None:
    if depth > 20 or not isinstance(ancestors, list):
        return
    child = stage_of_run.get(child, child)
    for node in ancestors:
        if not isinstance(node, dict) or not isinstance(node.get("ref"), str):
            continue
        parent = stage_of_run.get(node["ref"], node["ref"])
        known = parent in graph.nodes and child in graph.nodes
        # Edges between things the run already draws would only repeat its stage paths.
        if not known:
            graph.add_node(parent, node["ref"], "artifact", str(node.get("kind") or ""))
            graph.add_node(child, child, "artifact")
            graph.add_edge(parent, child, str(node.get("relation") or "parent"))
        _add_ancestors(graph, node["ref"], node.get("ancestors"), stage_of_run, depth + 1)


def _layers(graph: Graph) -> dict[str, int]:
    """Column of each node: the longest path reaching it from a source (cycles cut)."""
    layer = {node: 0 for node in graph.nodes}
    for _ in range(len(graph.nodes)):
        changed = False
        for source, target, _ in graph.edges:
            if layer[target] < layer[source] + 1 <= len(graph.nodes):
                layer[target] = layer[source] + 1
                changed = True
        if not changed:
            break
    return layer


def _positions(graph: Graph) -> dict[str, tuple[float, float]]:
    layer = _layers(graph)
    columns: dict[int, list[str]] = {}
    for node in graph.nodes:  # insertion order: pipeline order first
        columns.setdefault(layer[node], []).append(node)
    order: dict[str, float] = {}
    for col in sorted(columns):
        # Sort a column by the mean row of its parents so arrows cross less.
        first_seen = {node: index for index, node in enumerate(columns[col])}

        def barycenter(node: str) -> float:
            rows = [order[s] for s, t, _ in graph.edges if t == node and s in order]
            return sum(rows) / len(rows) if rows else float(first_seen[node])

        columns[col].sort(key=barycenter)
        for row, node in enumerate(columns[col]):
            order[node] = row
    return {
        node: (PAD + layer[node] * (NODE_W + COL_GAP), PAD + order[node] * (NODE_H + ROW_GAP)) for node in graph.nodes
    }


def _short(text: str, limit: int = 23) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render_svg(graph: Graph) -> str:
    """The graph as an inline ``<svg>`` (empty string when there is nothing to draw)."""
    if not graph.nodes:
        return ""
    pos = _positions(graph)
    width = max(x for x, _ in pos.values()) + NODE_W + PAD
    height = max(y for _, y in pos.values()) + NODE_H + PAD
    e = html.escape
    parts = [
        f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="lineage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
    ]
    for source, target, relation in graph.edges:
        (x0, y0), (x1, y1) = pos[source], pos[target]
        sx, sy, tx, ty = x0 + NODE_W, y0 + NODE_H / 2, x1, y1 + NODE_H / 2
        if tx <= sx:  # same or earlier column (a cut cycle): leave from the bottom
            sx, sy = x0 + NODE_W / 2, y0 + NODE_H
        mid = (sx + tx) / 2
        parts.append(
            f'<path class="edge" data-from="{e(source)}" data-to="{e(target)}" data-relation="{e(relation)}" '
            f'd="M{sx:.1f},{sy:.1f} C{mid:.1f},{sy:.1f} {mid:.1f},{ty:.1f} {tx:.1f},{ty:.1f}" fill="none" '
            f'stroke="#888" stroke-width="1.3" marker-end="url(#arrow)"><title>{e(source)} \u2192 {e(target)} '
            f"({e(relation)})</title></path>"
        )
    for node_id, node in graph.nodes.items():
        x, y = pos[node_id]
        stage = node["kind"] == "stage"
        fill, stroke = ("#dbe8fb", "#5b8bd6") if stage else ("#f7f7f7", "#aaa")
        weight = ' font-weight="bold"' if stage else ""
        parts.append(
            f'<g class="node node-{e(node["kind"])}" data-id="{e(node_id)}" transform="translate({x:.0f},{y:.0f})">'
            f"<title>{e(node['label'])}{' - ' + e(node['detail']) if node['detail'] else ''}</title>"
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="{10 if stage else 3}" fill="{fill}" stroke="{stroke}"/>'
            f'<text x="8" y="18" font-size="13" font-family="ui-monospace, monospace"{weight}>'
            f"{e(_short(node['label']))}</text>"
            f'<text x="8" y="35" font-size="11" fill="#666" font-family="system-ui, sans-serif">'
            f"{e(_short(node['detail'], 29))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)
