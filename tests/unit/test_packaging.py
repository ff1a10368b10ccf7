"""The package metadata builds cleanly: an SPDX license string, no setuptools deprecations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD_METADATA = """
import sys
from setuptools import build_meta
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def test_metadata_has_an_spdx_license_and_builds_without_deprecation_warnings(tmp_path):
    # Build the wheel metadata of a copy (the project files setuptools reads, with empty
    # packages), so that nothing is written into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("rlhf", "reward_data"):
        (src / package).mkdir()
        (src / package / "__init__.py").write_text("")
    (src / "rlhf" / "py.typed").write_text("")
    out = tmp_path / "meta"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-W", "always", "-c", BUILD_METADATA, str(out)], cwd=src,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Deprecat" not in proc.stderr and "deprecat" not in proc.stderr, proc.stderr[-3000:]
    metadata = (out / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
