"""``rlhf env``: the versions, devices and paths a bug report needs, in one place.

Prints what is installed (from package metadata, so a broken optional package cannot stop
the report), the devices torch sees and the paths rlhf reads and writes. ``--json`` gives
the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata

#: Packages a run uses, then the optional ones (trackers, PostgreSQL, GGUF, serving).
PACKAGES = ("rlhf", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "tokenizers",
            "huggingface_hub", "numpy", "pyyaml")
OPTIONAL = ("wandb", "tensorboard", "trackio", "mlflow", "plotly", "psycopg", "gguf", "vllm", "deepspeed")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict:
    import torch

    info: dict = {"threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                  "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if info["cuda"]:
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
    return info


def collect() -> dict:
    """Everything ``rlhf env`` reports, as plain data."""
    import rlhf
    from rlhf.paths import rlhf_home
    from rlhf.registry.registry import locate

    home = rlhf_home().expanduser().resolve()
    url, artifacts = locate()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # rlhf's own version from the code that runs (an installed copy may be another one)
        "packages": {name: rlhf.__version__ if name == "rlhf" else _version(name) for name in PACKAGES},
        "optional": {name: _version(name) for name in OPTIONAL},
        "devices": _devices(),
        "paths": {
            "home": str(home),
            "registry": url.display,
            "artifacts": str(artifacts),
            "data_store": str(home / "data"),
            "hf_cache": os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"),
            "cwd": os.getcwd(),
        },
        "environment": {k: os.environ[k] for k in sorted(os.environ)
                        if k.startswith(("RLHF_", "HF_", "CUDA_VISIBLE", "OMP_NUM_THREADS", "WANDB_MODE"))
                        and "TOKEN" not in k and "KEY" not in k and "PASSWORD" not in k},
    }


def _lines(info: dict) -> list[str]:
    lines = [f"python      {info['python']} on {info['platform']} ({info['cpus']} CPUs)"]
    for group in ("packages", "optional"):
        installed = [f"{k} {v}" for k, v in info[group].items() if v]
        missing = [k for k, v in info[group].items() if not v]
        lines.append(f"{group + ':':<11} " + ", ".join(installed)
                     + (f" (not installed: {', '.join(missing)})" if missing else ""))
    d = info["devices"]
    gpus = f"CUDA {d.get('cuda_version')}: {', '.join(d.get('gpus', []))}" if d["cuda"] else "no CUDA"
    lines.append(f"devices:    {gpus}; MPS {'yes' if d['mps'] else 'no'}; torch threads {d['threads']}")
    for k, v in info["paths"].items():
        lines.append(f"{k + ':':<11} {v}")
    for k, v in info["environment"].items():
        lines.append(f"{'env:':<11} {k}={v}")
    return lines


def main(argv: list[str]) -> int:
    """``rlhf env [--json] [--home DIR]``; returns the exit status."""
    from rlhf.paths import add_home_option, use_home

    parser = argparse.ArgumentParser(prog="rlhf env", description="Print versions, devices and paths (for bug reports).")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_home_option(parser)
    args = parser.parse_args(argv)
    use_home(args.home)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else "\n".join(_lines(info)))
    return 0
