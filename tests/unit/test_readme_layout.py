"""README's Layout section matches the tree: every path it names exists, and every module and
package of rlhf/ (and every stage file) is described there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_TOPS = ("rlhf/", "reward_data/", "pipelines/", "scripts/", "tests/")


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def named_paths(layout: str) -> set[str]:
    """The repository paths ``layout`` names: each entry (its first column), the full paths in
    its description, and bare ``file.py`` or ``folder/`` names, taken relative to the entry's
    folder (``sft.py`` on the rlhf/stages/ line is rlhf/stages/sft.py)."""
    names, entry = set(), ""
    for line in layout.splitlines():
        if line.strip() and not line.startswith(" "):
            entry = line.split()[0]
            names.add(entry.rstrip("/"))
        where = entry if entry.endswith("/") else entry.rpartition("/")[0] + "/"
        for token in re.findall(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)*/?)", line):
            full = token.startswith(_TOPS)
            if full or re.fullmatch(r"\w+\.py|\w+/", token):
                names.add((token if full else where + token).rstrip("/"))
    return names


def test_every_path_the_layout_names_exists():
    missing = sorted(p for p in named_paths(_layout()) if not (ROOT / p).exists())
    assert missing == []


def test_every_module_of_rlhf_and_every_stage_is_described():
    named = named_paths(_layout())
    modules = [p for p in (ROOT / "rlhf").iterdir()
               if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file()]
    modules += [p for p in (ROOT / "rlhf" / "stages").glob("*.py")]
    assert sorted(str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in named) == []


def test_the_layout_check_reads_entries_and_bare_names():
    layout = ("rlhf/stages/           the table (__init__.py); sft.py, ppo.py\n"
              "rlhf/models.py         bases;  rlhf/gguf.py: GGUF\n"
              "                       readers/ of reward_data\n")
    assert named_paths(layout) == {"rlhf/stages", "rlhf/stages/__init__.py", "rlhf/stages/sft.py",
                                   "rlhf/stages/ppo.py", "rlhf/models.py", "rlhf/gguf.py", "rlhf/readers"}
