"""Merge a registered LoRA adapter into its base and write a standalone model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (sft/policy adapters) or
``AutoModelForSequenceClassification.from_pretrained`` (reward/value adapters, one output),
needs neither peft nor the registry, and carries the tokenizer.

Nothing here unpickles: the base is loaded with ``use_safetensors=True`` and the adapter
and head tensors are read with ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from rlhf.atomic import write_dir
from rlhf.paths import current_umask
from rlhf.registry.entry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_ROLES,
    HEAD_WEIGHTS,
    Entry,
    RegistryError,
)

EXPORT_META = "rlhf_export.json"

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"export dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def base_source(base: Entry) -> tuple[str, str | None]:
    """What ``from_pretrained`` should load for a base entry: ``(path or hub id, revision)``."""
    if base.metadata.get("source") == "hub":
        return base.metadata["hub_id"], base.metadata.get("revision")
    if base.path is None or not base.path.is_dir():
        raise RegistryError(f"base {base.ref}: its directory {base.path} is missing")
    return str(base.path), None


def _load_tokenizer(adapter: Entry, src: str, revision: str | None):
    """The tokenizer the adapter was trained with: the one saved beside it, else the base's
    loaded as the stages load it (:func:`rlhf.models.load_tokenizer`, the run's chat template)."""
    from rlhf.adapters import adapter_facts as _adapter_facts
    from rlhf.models import load_tokenizer

    template = _adapter_facts(adapter.path)[1]
    return load_tokenizer(src, revision, chat_template=template, adapter_dir=adapter.path)


def _score_layer(model):
    import torch

    for attr in ("score", "classifier"):
        layer = getattr(model, attr, None)
        if isinstance(layer, torch.nn.Linear):
            return attr, layer
    raise RegistryError(
        f"{type(model).__name__} has no linear 'score'/'classifier' head; cannot place the reward/value head"
    )


def merge_adapter(adapter: Entry, base: Entry, dtype: str = "auto"):
    """Load base + adapter (+ head) and return ``(merged model, tokenizer)``.

    Raises:
        RegistryError: when adapter tensors do not fit the base (missing or unexpected keys,
            head shape differs from the base's hidden size).
    """
    import torch
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    role = adapter.role
    src, revision = base_source(base)
    tok = _load_tokenizer(adapter, src, revision)
    kw = dict(revision=revision, dtype=_torch_dtype(dtype), use_safetensors=True, trust_remote_code=False)
    if role in HEAD_ROLES:
        from rlhf.models import classifier_from_pretrained  # no load report for the new head

        model = classifier_from_pretrained(src, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
    from rlhf.models import _align_with_tokenizer

    _align_with_tokenizer(model, tok)  # a pad the stages added: the same zero row they trained with

    # Find the head before peft wraps it (modules_to_save replaces it with a wrapper).
    head_attr = _score_layer(model)[0] if role in HEAD_ROLES else None
    config = PeftConfig.from_pretrained(str(adapter.path))
    config.inference_mode = True
    if head_attr is not None and config.modules_to_save:
        # The head is not merged through peft: head.safetensors (below) is authoritative.
        config.modules_to_save = [m for m in config.modules_to_save if m != head_attr] or None
    peft_model = PeftModel(model, config)
    state = load_file(str(adapter.path / ADAPTER_WEIGHTS))
    if head_attr is not None:
        # peft saves a SEQ_CLS model's score layer with the adapter (modules_to_save); the
        # head.safetensors written by the stage is the authoritative head, set after merging.
        state = {k: v for k, v in state.items() if not k.startswith(f"base_model.model.{head_attr}.")}
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise RegistryError(
            f"{adapter.path / ADAPTER_WEIGHTS}: adapter does not fit base {base.ref} "
            f"(unexpected keys {unexpected[:5]}, missing LoRA keys {missing[:5]})"
        )
    merged = peft_model.merge_and_unload()

    if role in HEAD_ROLES:
        head = load_file(str(adapter.path / HEAD_WEIGHTS))
        attr, layer = _score_layer(merged)
        w = head["weight"]
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise RegistryError(
                f"{adapter.path / HEAD_WEIGHTS}: tensor 'weight' has shape {tuple(w.shape)}, "
                f"but {attr} of base {base.ref} has {tuple(layer.weight.shape)}"
            )
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
            if "bias" in head:
                if layer.bias is None:
                    if torch.count_nonzero(head["bias"]) > 0:
                        raise RegistryError(
                            f"{adapter.path / HEAD_WEIGHTS}: the head has a non-zero bias but the "
                            f"{type(merged).__name__}.{attr} layer has none; the exported model could not hold it"
                        )
                else:
                    layer.bias.copy_(head["bias"].to(layer.bias.dtype))
    # Sequence classifiers pool at the last non-pad token, so they need the pad id.
    if getattr(merged.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        merged.config.pad_token_id = tok.pad_token_id
    if role not in HEAD_ROLES and getattr(merged, "generation_config", None) is not None:
        from rlhf.models import stop_token_ids

        # plain transformers' generate then stops where the stages stopped (e.g. <|im_end|>
        # on a ChatML base whose EOS is <|endoftext|>)
        merged.generation_config.eos_token_id = stop_token_ids(tok, merged)
    merged.eval()
    return merged, tok


def _follow_umask(root: Path, umask: int) -> None:
    """Give ``root`` and everything under it the modes the user's umask gives new files.

    mkdtemp makes the directory 0700 and some savers write through private temp files
    (0600); an export is a model to share, so it gets what any file the user creates gets.
    """
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, 0o777 & ~umask)
        for f in filenames:
            os.chmod(Path(dirpath) / f, 0o666 & ~umask)


def export_adapter(adapter: Entry, base: Entry, out_dir: Path, dtype: str = "auto") -> Path:
    """Write the merged model of ``adapter`` on ``base`` to ``out_dir`` (atomically).

    ``out_dir`` must not exist or be empty. The model is written to a temporary sibling
    directory and renamed into place once complete, with ``rlhf_export.json`` recording
    which registry entries it came from.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"export: {out_dir} exists and is not an empty directory")
    if not (adapter.path / ADAPTER_CONFIG).is_file():
        raise RegistryError(f"export: {adapter.ref} has no {ADAPTER_CONFIG}")
    steps = tqdm(total=3, desc=f"export {adapter.ref}", disable=None, leave=False)
    steps.set_postfix_str("load + merge")
    merged, tok = merge_adapter(adapter, base, dtype)
    steps.update(1)
    umask = current_umask()

    def fill(tmp: Path) -> None:
        steps.set_postfix_str("save")
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        steps.update(1)
        meta = {
            "adapter": adapter.ref,
            "role": adapter.role,
            "base": base.ref,
            "base_source": base.metadata.get("hub_id") or base.metadata.get("local_path"),
            "base_revision": base.metadata.get("revision") or base.metadata.get("content_hash"),
            "adapter_files": adapter.files,
            "model_class": "AutoModelForSequenceClassification" if adapter.role in HEAD_ROLES else "AutoModelForCausalLM",
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _follow_umask(tmp, umask)

    try:
        write_dir(out_dir, fill)
        steps.update(1)
    finally:
        steps.close()
    return out_dir
