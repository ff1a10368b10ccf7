"""Reading stage inputs (already resolved by rlhf.resolve): SFT examples and PPO prompts
from files, hub datasets or the data store."""

from __future__ import annotations

from pathlib import Path


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Read rows from a local JSON/JSONL(.gz)/CSV/Parquet file, a ``load_from_disk`` directory,
    or a hub dataset id (the same loader for all; hub ids need network access).

    Raises:
        FileNotFoundError: naming ``source`` when it is neither a file, a directory nor a hub id.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        suffixes = "".join(path.suffixes[-2:]).lower()
        if suffixes.endswith(".jsonl") or suffixes.endswith(".jsonl.gz") or suffixes.endswith(".json"):
            builder = "json"
        elif suffixes.endswith(".csv"):
            builder = "csv"
        elif suffixes.endswith(".parquet"):
            builder = "parquet"
        else:
            raise ValueError(f"{source}: unsupported file type (use .jsonl, .json, .csv or .parquet)")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        return ds.to_list()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        return ds.to_list()
    if "/" in source and not source.startswith((".", "/")):
        return datasets.load_dataset(source, split=split).to_list()
    raise FileNotFoundError(f"dataset not found: {source}")


def as_messages(value, role: str, where: str, field: str) -> list[dict]:
    """The one formatting path of every stage: a field as a message list.

    A plain string becomes one ``role`` turn, so that SFT rows, preference pairs and PPO
    prompts given as strings reach the chat template exactly like conversational rows (one
    token layout for all stages); a message list passes through.

    Raises:
        ValueError: naming ``where`` (file and row) and ``field``.
    """
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return value
    raise ValueError(f"{where}: field {field!r} must be a string or a list of {{role, content}} messages")


def prompt_messages(row: dict, where: str) -> list[dict]:
    """The prompt of a row as a message list (a plain string becomes one user turn)."""
    return as_messages(row.get("prompt"), "user", where, "prompt")


def load_prompts(source: str, split: str = "train") -> list[list[dict]]:
    """PPO prompts as message lists, from a file/dataset or a reward_data reference (its
    ``split``: train prompts for training, test prompts for evaluation)."""
    return [messages for messages, _ in load_prompt_rows(source, split)]


def load_prompt_rows(source: str, split: str = "train") -> list[tuple[list[dict], dict]]:
    """``(messages, metadata)`` per prompt row: the prompt as :func:`load_prompts` reads it,
    and the row's other columns (e.g. the reference answer a verifiable reward checks;
    ``{}`` for a reward_data reference), which PPO's reward functions receive."""
    from rlhf.resolve import is_store_ref

    if is_store_ref(source):
        import reward_data

        return [(rec["prompt"], {}) for rec in reward_data.read_split(source, split)]
    rows = load_rows(source)
    return [(prompt_messages(r, f"{source} row {i}"), {k: v for k, v in r.items() if k != "prompt"})
            for i, r in enumerate(rows)]
