"""Shared fixtures: every test gets its own RLHF_HOME and runs offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "rlhf_home"))
    yield


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture
def shared_datasets() -> Path:
    """The real data samples beside the checkout.

    Tests using them skip when the samples are absent, except under ``CI=true``: a CI job
    that lost its data must fail, not pass with those tests quietly skipped.
    """
    if not SHARED_DATASETS.is_dir():
        if _ci():
            pytest.fail(f"{SHARED_DATASETS} not present and CI is set: the real-data tests cannot run")
        pytest.skip(f"{SHARED_DATASETS} not present")
    return SHARED_DATASETS
