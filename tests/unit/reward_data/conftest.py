"""Helpers for the reward_data tests: write small inputs, read back every stored record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reward_data


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts, or raw str/bytes lines) as a JSONL file and return its path."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for row in rows:
                if isinstance(row, bytes):
                    f.write(row + b"\n")
                elif isinstance(row, str):
                    f.write(row.encode() + b"\n")
                else:
                    f.write(json.dumps(row).encode() + b"\n")
        return path

    return write


def all_records(ref, split: str | None = None) -> list[dict]:
    splits = [split] if split else ["train", "test"]
    recs = [r for s in splits for r in reward_data.read_split(ref, s)]
    return sorted(recs, key=lambda r: (r["source"]["file"], r["source"]["row"], r.get("item") or ""))


def quarantine(ref) -> list[dict]:
    return list(reward_data.read_split(ref, "quarantine"))


@pytest.fixture
def records():
    return all_records


@pytest.fixture
def quarantined():
    return quarantine


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
