"""hasten's features with a LoRA loaded through diffusers' PEFT integration (load, fuse, unfuse, set_adapters).

A tiny LoRA (rank 4 on every attention projection, nonzero random A and B) is made with peft, saved with
``save_lora_weights`` and loaded with ``load_lora_weights`` into a tiny Wan pipeline. Under each feature the
LoRA must change the output the way it does without the feature: the LoRA delta (LoRA on - LoRA off) with
the feature is compared to the delta at baseline, and the feature must still do its work (first-block rows).
Quantization: a LoRA loaded on top of quantized layers works unfused; fusing into quantized weights is
refused (hasten's quantized weights are read-only); fuse -> unload -> quantize works.
"""

from __future__ import annotations

from pathlib import Path

import families as F
import pytest
import torch

import hasten  # noqa: F401 - adds pipe.enable_*

import tiny_pipes

pytest.importorskip("peft")

SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")
FEATURES = {
    "easycache0": lambda p: p.enable_easycache(threshold=0.0),
    "easycache": lambda p: p.enable_easycache(threshold=0.2),
    "ag": lambda p: p.enable_adaptive_guidance(mode="ag", threshold=0.9),
    "sparse": lambda p: p.enable_sparse_attention(**SPARSE),
}
# relative error of the LoRA delta under the feature vs. at baseline. AG (measured 0.81, cosine 0.59): on this
# tiny random model cond and uncond agree from step 2, so AG drops the uncond branch and the LoRA's effect on it
# (which CFG amplifies) with it - AG's own quality cost, the same without a LoRA, not a LoRA conflict.
DELTA_TOL = {"easycache0": 1e-5, "easycache": 0.35, "ag": 0.9, "sparse": 0.35}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return tiny_pipes.wan_lora_file(tmp_path_factory.mktemp("lora"))


def _pipe(lora_dir: Path | None, feature: str | None = None):
    pipe, kw = tiny_pipes.wan()
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), adapter_name="a")
    if feature is not None:
        FEATURES[feature](pipe)
    return pipe, kw


def _run(pipe, kw) -> tuple[torch.Tensor, int]:
    with F.FirstBlockCounter(pipe) as c:
        out = tiny_pipes.run(pipe, kw)
        rows, _ = c.take()
    return out, rows


@pytest.fixture(scope="module")
def baseline(lora_dir: Path) -> dict[str, torch.Tensor]:
    base, _ = _run(*_pipe(None))
    lora, _ = _run(*_pipe(lora_dir))
    assert (lora - base).norm() > 0.03 * base.norm()  # the LoRA really changes the output
    return {"base": base, "lora": lora, "delta": lora - base}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("feature", list(FEATURES))
def test_lora_changes_output_the_same_way_under_each_feature(lora_dir: Path, baseline: dict, feature: str) -> None:
    off, rows_off = _run(*_pipe(None, feature))
    on, rows_on = _run(*_pipe(lora_dir, feature))
    err = _rel(on - off, baseline["delta"])
    assert err <= DELTA_TOL[feature], f"{feature}: LoRA delta relative error {err:.3f}"
    cos = float(torch.nn.functional.cosine_similarity((on - off).flatten(), baseline["delta"].flatten(), dim=0))
    assert cos > 0.5, f"{feature}: LoRA delta points elsewhere (cosine {cos:.2f})"
    full = 2 * tiny_pipes.STEPS
    if feature in ("easycache", "ag"):  # the feature still skips work with the LoRA loaded
        assert rows_on < full, rows_on
    else:
        assert rows_on == rows_off == full
    if feature == "easycache0":
        assert torch.equal(on, baseline["lora"])


def test_fuse_unfuse_set_adapters_under_easycache(lora_dir: Path, baseline: dict) -> None:
    pipe, kw = _pipe(lora_dir, "easycache")
    unfused, rows = _run(pipe, kw)
    assert rows < 2 * tiny_pipes.STEPS
    pipe.fuse_lora()
    fused, _ = _run(pipe, kw)
    assert (fused - unfused).abs().max() < 1e-4  # fusing changes nothing, and the cache follows the new weights
    pipe.unfuse_lora()
    again, _ = _run(pipe, kw)
    assert (again - unfused).abs().max() < 1e-4
    pipe.set_adapters(["a"], [0.0])  # adapter weight 0: the cached run of the plain model
    zero, _ = _run(pipe, kw)
    plain, _ = _run(*_pipe(None, "easycache"))
    assert (zero - plain).abs().max() < 1e-5
    pipe.set_adapters(["a"], [1.0])
    assert (_run(pipe, kw)[0] - unfused).abs().max() < 1e-5
    pipe.disable_easycache()
    assert (_run(pipe, kw)[0] - baseline["lora"]).abs().max() < 1e-5


def test_lora_on_quantized_layers(lora_dir: Path, baseline: dict) -> None:
    """quantize -> load LoRA (unfused) works: the adapter runs beside the quantized base layer."""
    pipe, kw = _pipe(None)
    hasten.quantize_(pipe.transformer, "int8")
    qbase, _ = _run(pipe, kw)
    pipe.load_lora_weights(str(lora_dir), adapter_name="a")
    qlora, _ = _run(pipe, kw)
    assert _rel(qlora - qbase, baseline["delta"]) < 0.05
    with pytest.raises(RuntimeError, match="read-only"):  # fusing into int8 weights is refused, not silently wrong
        pipe.fuse_lora()


def test_fuse_then_quantize(lora_dir: Path, baseline: dict) -> None:
    """load -> fuse -> unload -> quantize: the LoRA is baked into the weights that get quantized."""
    pipe, kw = _pipe(lora_dir)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    hasten.quantize_(pipe.transformer, "int8")
    out, _ = _run(pipe, kw)
    assert _rel(out - baseline["base"], baseline["delta"]) < 0.1
    assert _rel(out, baseline["lora"]) < 0.01
