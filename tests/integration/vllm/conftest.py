"""vLLM engine tests: they run in the vLLM environment (``bash scripts/test_vllm.sh``) and skip
elsewhere. Every test of this folder carries the ``vllm`` marker.

The tiny base here has 2 heads of 32 dimensions instead of the builtin 4 x 16: vLLM's CPU
attention kernels take head sizes of 32 and up. The engine core runs inside the test
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no engine process to spawn per test.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - absent, or present but broken: the tests cannot run either way
    HAVE_VLLM = False


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(pytest.mark.skip(reason="vllm is not installed here (bash scripts/test_vllm.sh)"))


@pytest.fixture(scope="session")
def tiny_shape() -> dict:
    return {"num_attention_heads": 2, "num_key_value_heads": 2}
