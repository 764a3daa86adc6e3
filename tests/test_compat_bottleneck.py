"""Bottleneck sampling under torch.compile and with a PEFT LoRA (issue 15's compatibility table).

Bottleneck sampling patches only the scheduler: the denoiser sees a smaller latent in the middle stage. Under
``transformer.compile()`` that shape change is a recompile, once per stage shape and never per step:
* ``dynamic=False``: one graph per stage shape (full, low-res) plus the first step's other latent strides;
  going back to full size reuses the full-size graph. Measured on the tiny Wan (3 stages): 3 graphs.
* ``dynamic=None`` (torch's default, "automatic dynamic"): the second shape makes dynamo recompile the graph
  with symbolic sizes, which then serves every later size. Measured: 3 graphs.
A second run compiles nothing new. A LoRA (load, fuse, unfuse, set_adapters) changes the bottleneck run the way
it changes the full-resolution run. Context parallelism: tests/test_parallel.py ("bottleneck" rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import hasten  # noqa: F401 - adds pipe.enable_*

import tiny_pipes

SIZE = dict(height=32, width=32)  # latent side 4: the 0.5 stage is 2 (the tiny Wan's patch size)
MAX_GRAPHS = 3


def _wan(bottleneck: bool = True) -> tuple[Any, dict]:
    pipe, kw = tiny_pipes.wan()
    if bottleneck:
        pipe.enable_bottleneck_sampling()
    return pipe, {**kw, **SIZE}


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0
        self.shapes: list[tuple] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return gm.forward


class _Shapes:
    """Latent sizes the transformer sees (a pre-hook: proves the low-res stage ran)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[tuple[int, ...]] = []
        self.h = module.register_forward_pre_hook(
            lambda m, a, k: self.seen.append(tuple((k.get("hidden_states") if "hidden_states" in k else a[0]).shape)),
            with_kwargs=True)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("dynamic", [False, None], ids=["dynamic-False", "dynamic-None"])
def test_compiled_bottleneck_recompiles_once_per_stage_shape(dynamic: bool | None) -> None:
    pipe, kw = _wan()
    shapes = _Shapes(pipe.transformer)
    ref = tiny_pipes.run(pipe, kw)
    sizes = sorted({s[-2:] for s in shapes.seen})
    assert len(sizes) == 2, f"the low-resolution stage did not run: {sizes}"

    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend()
    pipe, kw = _wan()
    pipe.transformer.compile(backend=backend, dynamic=dynamic)
    out = tiny_pipes.run(pipe, kw)
    first = backend.graphs
    out2 = tiny_pipes.run(pipe, kw)
    print(f"dynamic={dynamic}: {first} graphs in run 1, {backend.graphs} after run 2, recompiles "
          f"{dict(counters['recompiles'])}")
    assert 0 < first <= MAX_GRAPHS and backend.graphs == first, (first, backend.graphs)
    assert not dict(counters["graph_break"])
    assert (out - ref).abs().max() <= 1e-5 and (out2 - ref).abs().max() <= 1e-5
    pipe.disable_bottleneck_sampling()  # back to the full-resolution run, still compiled
    full = tiny_pipes.run(pipe, kw)
    assert (full - tiny_pipes.run(*_wan(False))).abs().max() <= 1e-5


def test_compiled_bottleneck_with_easycache() -> None:
    """Bottleneck + EasyCache (hooks moved outside the compiled region): same output and timeline as eager."""
    pipe, kw = _wan()
    pipe.enable_easycache(threshold=0.2)
    ref, ref_summary = tiny_pipes.run(pipe, kw), hasten.summary(pipe)
    torch._dynamo.reset()
    backend = CountingBackend()
    pipe, kw = _wan()
    pipe.enable_easycache(threshold=0.2)
    pipe.transformer.compile(backend=backend)
    out = tiny_pipes.run(pipe, kw)
    first = backend.graphs
    tiny_pipes.run(pipe, kw)
    assert 0 < first <= MAX_GRAPHS and backend.graphs == first
    assert (out - ref).abs().max() <= 1e-5 and hasten.summary(pipe) == ref_summary
    assert "reused   0" not in ref_summary


# -- LoRA --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    torch.set_num_threads(1)
    return tiny_pipes.wan_lora_file(tmp_path_factory.mktemp("lora"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lora_under_bottleneck(lora_dir: Path) -> None:
    """At 64 px (16 tokens, 4 in the low-res stage) the LoRA's effect keeps its direction under bottleneck
    sampling (measured cosine 0.755 at 32 px, where the low-res stage is a single token); fuse / unfuse /
    set_adapters behave exactly as without it."""
    global SIZE
    size, SIZE = SIZE, dict(height=64, width=64)
    try:
        _lora_under_bottleneck(lora_dir)
    finally:
        SIZE = size


def _lora_under_bottleneck(lora_dir: Path) -> None:
    base = tiny_pipes.run(*_wan(False))
    pipe, kw = _wan(False)
    pipe.load_lora_weights(str(lora_dir), adapter_name="a")
    delta = tiny_pipes.run(pipe, kw) - base

    plain = tiny_pipes.run(*_wan())
    pipe, kw = _wan()
    pipe.load_lora_weights(str(lora_dir), adapter_name="a")  # loaded after enabling: the scheduler patch stays
    unfused = tiny_pipes.run(pipe, kw)
    err = _rel(unfused - plain, delta)
    cos = float(torch.nn.functional.cosine_similarity((unfused - plain).flatten(), delta.flatten(), dim=0))
    print(f"bottleneck: LoRA delta rel err {err:.3f} cos {cos:.3f}")
    assert (unfused - plain).norm() > 0.03 * plain.norm() and cos > 0.6
    pipe.fuse_lora()
    assert (tiny_pipes.run(pipe, kw) - unfused).abs().max() < 1e-4
    pipe.unfuse_lora()
    assert (tiny_pipes.run(pipe, kw) - unfused).abs().max() < 1e-4
    pipe.set_adapters(["a"], [0.0])
    assert (tiny_pipes.run(pipe, kw) - plain).abs().max() < 1e-5
    pipe.set_adapters(["a"], [1.0])
    assert (tiny_pipes.run(pipe, kw) - unfused).abs().max() < 1e-5
    pipe.disable_bottleneck_sampling()
    assert (tiny_pipes.run(pipe, kw) - (base + delta)).abs().max() < 1e-4
