"""Pickle-free training state: optimizer, scheduler and RNG states as safetensors + JSON.

``torch.save``/``torch.load`` unpickle, and a checkpoint directory is a file a user may
receive from elsewhere. Our PPO checkpoints therefore hold only tensors (safetensors) and
plain JSON, written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _flatten(obj, prefix: str, tensors: dict, ) -> object:
    """Replace tensors in a nested structure by ``{"__tensor__": key}`` references."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, "", {}) if not isinstance(k, (str, int)) else k,
                              _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot checkpoint value of type {type(obj).__name__} at {prefix}")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(state: dict, directory: Path, name: str) -> None:
    """Save a nested dict of tensors/plain values as ``name.safetensors`` + ``name.json``."""
    tensors: dict = {}
    skeleton = _flatten(state, name, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str, device: str | torch.device = "cpu") -> dict:
    tensors = load_file(str(directory / f"{name}.safetensors"), device=str(device))
    return _unflatten(json.loads((directory / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    state = {
        "python": json.loads(json.dumps(random.getstate(), default=list)),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_checkpoint_dir(root: Path, name: str, writer) -> Path:
    """Create ``root/name`` atomically: ``writer(tmp_dir)`` fills a temporary directory that is
    then renamed into place, so a killed run never leaves a half checkpoint under ``name``.

    The checkpoint carries ``root``'s config fingerprint (:func:`rlhf.runs.stamp_checkpoint`)
    and the umask's mode, like the rest of the run directory."""
    from rlhf.atomic import write_dir
    from rlhf.runs import stamp_checkpoint

    def fill(tmp: Path) -> None:
        writer(tmp)
        stamp_checkpoint(tmp)
        (tmp / "COMPLETE").write_text("ok")

    return write_dir(root / name, fill)


def complete_checkpoints(root: Path, prefix: str) -> list[tuple[int, Path]]:
    """``(number, dir)`` of every complete ``prefix-N`` checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(f"{prefix}-") and (d / "COMPLETE").exists():
            try:
                found.append((int(d.name.rsplit("-", 1)[1]), d))
            except ValueError:
                continue
    return sorted(found)
