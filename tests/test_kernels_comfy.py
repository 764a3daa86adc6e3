"""The "Sparse Attention (hasten)" node in the real ComfyUI engine (in-process) on tiny Wan 2.1."""

from __future__ import annotations

import sys

import pytest
import torch

import comfy_env as ce

STEPS = 6
LATENT = 32  # Wan patchifies 2x2: 16x16 = 256 video tokens = 16 blocks of 16


@pytest.fixture(scope="module")
def wan(comfy):
    return ce.tiny_wan()


def _node(comfy):
    return comfy.node_classes["HastenSparseAttention"]


def _patch(comfy, model, target, **kw):
    settings = dict(block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0)
    settings.update(kw)
    (patched,) = _node(comfy)().patch(model, target, **settings)
    return patched


def _sample(comfy, model):
    return ce.run_ksampler(comfy, model, "wan", steps=STEPS, lat=ce.latent("wan", size=LATENT))


def _stats(comfy, model):
    return sys.modules[_node(comfy).__module__].stats(model)


def test_node_loads_through_comfyui(comfy):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["HastenSparseAttention"] == "Sparse Attention (hasten)"
    assert _node(comfy).__module__.startswith(comfy.pack.__name__)


def test_target_one_is_bit_identical(comfy, wan):
    base = _sample(comfy, wan)
    assert torch.equal(_sample(comfy, _patch(comfy, wan, 1.0)), base)


def test_sparse_run_stays_close_and_counts_per_layer(comfy, wan):
    base = _sample(comfy, wan)
    patched = _patch(comfy, wan, 0.9)
    out = _sample(comfy, patched)
    st = _stats(comfy, patched)
    # 2 self-attention layers x 6 steps (cond+uncond batched): dense 0-1, search 2 and 5, sparse 3-4
    assert (st.dense_calls, st.search_calls, st.sparse_calls) == (4, 4, 4)
    assert set(st.layers) == {"0", "2"}  # self-attention calls (cross-attention at 1 and 3 stays dense)
    assert all(c >= 0.9 - 1e-4 for _, c in st.layers.values())
    assert (out - base).abs().max() <= 0.02 * base.abs().max()
    again = _sample(comfy, patched)  # a new run starts from scratch
    assert torch.equal(again, out)
    assert _sample(comfy, wan).equal(base)  # the original model is untouched


def test_repatch_replaces_and_non_wan_is_refused(comfy, wan):
    twice = _patch(comfy, _patch(comfy, wan, 0.9), 1.0)
    assert torch.equal(_sample(comfy, twice), _sample(comfy, wan))
    with pytest.raises(Exception, match="supports Wan") as err:  # the pack's own UnsupportedModelError
        _patch(comfy, ce.tiny_sd3(), 0.9)
    assert type(err.value).__name__ == "UnsupportedModelError"
