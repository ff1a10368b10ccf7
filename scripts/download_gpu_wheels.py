"""Download the wheels the PPO benchmark needs on the GPU image into ``.whl/`` (git-ignored).

Usage::

    python scripts/download_gpu_wheels.py            # what the image lacks (about 2 MB)
    python scripts/download_gpu_wheels.py --all      # also pandas and pyarrow (about 67 MB)

The GPU machine (Python 3.12, torch 2.11, transformers 5.17, peft 0.21.0, accelerate 1.15)
reaches no package registry. Both sides of ``scripts/bench_ppo.py`` need ``datasets`` (our
side reads prompts with it; TRL 1.12's PPOTrainer imports it) and TRL's side needs
``trl==1.12.0``. This script downloads, here, with pip's cross-platform download
(``--python-version 3.12 --platform manylinux... --only-binary=:all: --no-deps``), every wheel
of that closure that the image does not hold, then checks that each wheel's requirements are
met by the folder or by the image, and prints the folder's size (the device tool carries at
most 64 MiB with the working tree). ``bench_ppo.py`` then installs them with
``pip install --no-index --no-deps`` (``install_missing_wheels``): only those the interpreter
lacks.

Which packages the image holds: ``/work/.library/device/KINDS.md`` lists the image's packages
as read on 2026-11-17, pandas, pyarrow, xxhash, fsspec, aiohttp, requests, jinja2 and pyyaml
among them. pyarrow (55 MB) and pandas (12 MB) together exceed the carry limit, so they are
fetched only with ``--all``, for an image that lacks them (carry ``.whl`` alone then, in a
working tree under 64 MiB: it is not enough with this repository).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The closure of trl 1.12.0 + datasets minus the GPU image's packages (KINDS.md), pinned to
# versions that agree with the image (huggingface_hub 1.33, numpy 2.5, fsspec <= 2026.9).
NEEDED = ["trl==1.12.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "orjson==3.13.0"]
LARGE = ["pandas==3.1.1", "pyarrow==26.0.1"]
# What KINDS.md lists on the image (normalised names), for the requirement check below.
IMAGE = set("""accelerate aiohttp certifi filelock fsspec huggingface-hub httpx jinja2 numpy packaging pandas peft
psutil pyarrow python-dateutil pyyaml regex requests rich safetensors tokenizers torch tqdm transformers
typing-extensions xxhash""".split())
PLATFORM = ["--only-binary=:all:", "--no-deps", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
            "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64", "--platform", "any"]
CARRY_LIMIT_MIB = 64


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def requirements(wheel: Path) -> list[str]:
    """Unconditional (non-extra) requirement names of ``wheel``, for Python 3.12 on Linux."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        req, _, marker = spec.partition(";")
        if "extra" in marker or "win32" in marker or "emscripten" in marker or 'python_version >= "3.14"' in marker:
            continue
        name = req.strip().split()[0]
        for sep in "<>=!~[(":
            name = name.split(sep)[0]
        out.append(_norm(name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(REPO / ".whl"), help="Wheel folder (git-ignored).")
    p.add_argument("--all", action="store_true", help="Also pandas and pyarrow (for an image without them).")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = NEEDED + (LARGE if args.all else [])
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", *PLATFORM,
                    "-d", str(dest), *wanted], check=True)
    wheels = sorted(dest.glob("*.whl"))
    have = {_norm(w.name.split("-")[0]) for w in wheels}
    names = {_norm(w.split("==")[0]) for w in wanted}
    stray = [w.name for w in wheels if _norm(w.name.split("-")[0]) not in names]
    if stray:
        print(f"warning: {dest} holds wheels this script did not ask for: {stray}", file=sys.stderr)
    unmet = sorted({(w.name, r) for w in wheels for r in requirements(w) if r not in have and r not in IMAGE})
    for wheel, req in unmet:
        print(f"error: {wheel} needs {req}, neither downloaded nor on the GPU image", file=sys.stderr)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{size:8.2f} MiB  total in {dest} ({len(wheels)} wheels; the device carries {CARRY_LIMIT_MIB} MiB "
          "with the working tree)")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
