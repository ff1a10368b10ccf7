"""Every input reference of a stage resolves here, once, before any model loads.

A config may name its inputs in several ways; :func:`resolve_inputs` turns each into what
the stage reads, so a stage never decides where something comes from:

  * base model: ``builtin:tiny`` (built on first use under ``$RLHF_HOME/builtin``), a local
    model directory, a hub id (passed through; ``from_pretrained`` fetches it), or a GGUF
    file (``path.gguf`` or ``package:MODULE/PATH.gguf``: converted once to a cached
    safetensors folder by :mod:`rlhf.gguf`)
  * adapters: a directory, or a model-registry reference ``name``, ``name:3``, ``name:prod``
  * data (SFT examples, prompts, evaluation prompts): a file or ``load_from_disk`` directory, a hub dataset
    id, or a data-store reference ``NAME[:VERSION]`` (pinned to the version it names now)
  * preference data: a data-store reference, or a file/directory that is ingested into the
    store here (reusing the newest version when it came from identical bytes and options)

Which keys of a stage's config are such references is declared by its row of the stage
table (``Stage.inputs`` in :mod:`rlhf.stages`); this module names no stage.

:func:`check_base` and :func:`check_input` are the side-effect-free checks a recipe gets
when it is validated; model and adapter directories must hold safetensors weights
(:func:`check_safetensors`), so a pickled ``pytorch_model.bin`` is refused before any stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rlhf.config import ConfigError, from_dict, to_dict

if TYPE_CHECKING:
    from rlhf.stages import Input

BUILTIN_TINY = "builtin:tiny"
_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".gz"}

C = TypeVar("C", bound=Any)  # a stage config dataclass


def resolve_inputs(cfg: C, inputs: Mapping[str, Input], stage: str) -> C:
    """A copy of stage ``stage``'s config with every input reference resolved (see the module doc).

    ``inputs`` is the stage's row of the stage table (:data:`rlhf.stages.STAGES`): which keys
    reference data, preferences or an adapter, and which may be empty. Under several
    processes rank 0 resolves (it alone builds the tiny base or ingests data) and every other
    rank receives its answer.

    Raises:
        ConfigError: naming the key whose reference does not resolve.
    """
    from rlhf import distributed as dist

    if not dist.is_distributed():
        return _resolve(cfg, inputs, stage)
    resolved = dist.broadcast_object(to_dict(_resolve(cfg, inputs, stage)) if dist.is_main() else None)
    return from_dict(type(cfg), resolved)


def _resolve(cfg: C, inputs: Mapping[str, Input], stage: str) -> C:
    # the data and adapter references first: a bad one fails before builtin:tiny is built (tens of seconds)
    check_base(cfg.model.name_or_path)
    cfg = _resolve_references(cfg, inputs, stage)
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, name_or_path=resolve_base(cfg.model.name_or_path, seed=cfg.seed)))


def _resolve_references(cfg: C, inputs: Mapping[str, Input], stage: str) -> C:
    resolved = {}
    for key, spec in inputs.items():
        value, name = getattr(cfg, key), f"{stage}.{key}"
        if not value and not spec.required:
            resolved[key] = ""
        elif spec.kind == "adapter":
            resolved[key] = resolve_adapter(name, value)
        elif spec.kind == "preferences":
            # the same store version for the same file and options, whichever stage reads it
            resolved[key] = resolve_preferences(name, value, cfg.dataset_format, cfg.eval_fraction)
        else:
            resolved[key] = resolve_data(name, value)
    return dataclasses.replace(cfg, **resolved)


def resolve_base(name_or_path: str, seed: int = 0) -> str:
    """Something ``from_pretrained`` accepts: a local model directory or a hub id.

    ``builtin:tiny`` is built once per seed (keyed by shape, vocabulary and seed) under
    ``$RLHF_HOME/builtin`` and its directory returned; a GGUF file's converted folder is
    returned (:func:`rlhf.gguf.gguf_base`, converting on first use).
    """
    check_base(name_or_path)
    from rlhf.gguf import gguf_base, is_gguf

    if is_gguf(name_or_path):
        return str(gguf_base(name_or_path))
    if name_or_path == BUILTIN_TINY:
        from rlhf.paths import rlhf_home
        from rlhf.tasks.synthetic import tiny_base

        return str(tiny_base(rlhf_home() / "builtin", seed=seed))
    return name_or_path


def check_base(name_or_path: str) -> None:
    """Check, without building or downloading anything, that a base reference can resolve.

    Raises:
        ConfigError: an unknown builtin, or a local path that is not a model directory.
    """
    if name_or_path.startswith("builtin:") and name_or_path != BUILTIN_TINY:
        raise ConfigError(f"model.name_or_path: unknown builtin model {name_or_path!r}; only {BUILTIN_TINY!r} exists")
    from rlhf.gguf import gguf_file, is_gguf

    if is_gguf(name_or_path):
        gguf_file(name_or_path)  # the file exists (converting waits for resolve_base)
        return
    p = Path(name_or_path).expanduser()
    if not (name_or_path.startswith((".", "/", "~")) or p.exists()):
        return  # a hub id: fetched by from_pretrained, which is told to load safetensors only
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {p} is not a model directory (no config.json)")
    check_safetensors("model.name_or_path", p)


# Weight files that torch.load would unpickle (arbitrary code on load); never read.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(key: str, directory: Path) -> None:
    """Check that a model or adapter directory holds safetensors weights, before anything trains.

    Raises:
        ConfigError: naming ``key`` and the directory when its weights are only pickled
            (``pytorch_model.bin``, ``adapter_model.bin``...) or absent.
    """
    files = [f.name for f in directory.iterdir() if f.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickled = sorted(name for name in files if name.endswith(_PICKLED))
    if pickled:
        raise ConfigError(
            f"{key}: {directory} holds only pickled weights ({', '.join(pickled)}), which rlhf never loads; "
            "convert them to safetensors first (e.g. load once where you trust the file, then "
            "save_pretrained(..., safe_serialization=True))")
    raise ConfigError(f"{key}: {directory} holds no *.safetensors weights")


def resolve_adapter(key: str, ref_or_path: str) -> str:
    """An adapter directory from a path or a model-registry reference ('name', 'name:3', 'name:prod')."""
    if not ref_or_path:
        raise ConfigError(f"{key}: required")
    if Path(ref_or_path).exists():
        if not Path(ref_or_path).is_dir():
            raise ConfigError(f"{key}: {ref_or_path} is not an adapter directory")
        check_safetensors(key, Path(ref_or_path))
        return str(ref_or_path)
    from rlhf.registry import Registry

    try:
        entry = Registry.open().resolve(ref_or_path)
    except Exception as e:  # noqa: BLE001 - re-raised naming the key
        raise ConfigError(f"{key}: {ref_or_path!r} is neither a directory nor a registry reference ({e})") from None
    if entry.kind != "adapter" or entry.path is None:
        raise ConfigError(f"{key}: registry entry {entry.ref} is a {entry.kind}, not an adapter")
    return str(entry.path)


def is_store_ref(source: str) -> bool:
    """True when ``source`` names a data-store entry ('NAME' or 'NAME:VERSION'), not a path or hub id."""
    return not Path(source).exists() and "/" not in source and Path(source).suffix not in _DATA_SUFFIXES


def resolve_data(key: str, value: str) -> str:
    """A readable data source: an existing path, a hub id, or a store reference pinned to
    ``NAME:VERSION``."""
    check_input(key, value)
    if is_store_ref(value):
        import reward_data

        info = reward_data.load_version(value)
        return f"{info.name}:{info.version}"
    return value


def resolve_preferences(key: str, value: str, dataset_format: str | None, test_fraction: float) -> str:
    """The store reference ``NAME:VERSION`` of preference data, ingesting a file or directory.

    A file is not ingested again when the newest version of its name came from identical
    bytes with the same options (reruns do not pile up copies).
    """
    import reward_data

    src = Path(value)
    if src.exists():
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in src.stem.split(".")[0]) or "preferences"
        if src.is_file() and reward_data.versions(name):
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            latest = reward_data.load_version(name)
            opts = latest.manifest.get("options", {})
            if ([s.get("sha256") for s in latest.manifest.get("sources", [])] == [digest]
                    and opts.get("test_fraction") == test_fraction and opts.get("format") == dataset_format):
                return f"{latest.name}:{latest.version}"
        info = reward_data.ingest([src], name, format=dataset_format, test_fraction=test_fraction)
        return f"{info.name}:{info.version}"
    try:
        info = reward_data.load_version(value)
    except Exception as e:  # noqa: BLE001 - re-raised with the config key named
        raise ConfigError(f"{key}: {value!r} is neither a file nor a data-store reference ({e})") from None
    return f"{info.name}:{info.version}"


def check_input(key: str, value: str) -> None:
    """Check, without side effects, that a data input can resolve: an existing file or
    directory, a store reference that exists, or a hub dataset id (not checkable offline).

    Raises:
        ConfigError: naming ``key``.
    """
    if not value:
        raise ConfigError(f"{key}: required")
    if Path(value).exists():
        return
    if is_store_ref(value):
        import reward_data

        try:
            reward_data.resolve(value.split("@")[0])
        except Exception as e:  # noqa: BLE001 - re-raised naming the key
            raise ConfigError(f"{key}: {value!r} is not in the data store ({e}); ingest it with `rlhf data ingest`") from None
        return
    if value.startswith((".", "/", "~")) or Path(value).suffix in _DATA_SUFFIXES:
        raise ConfigError(f"{key}: file not found: {value}")
