"""The "Sparse Attention (hasten)" node in the real ComfyUI engine (in-process): tiny Wan 2.1, SD1.x and SD3,
compared with the dense run."""

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
    (patched,) = ce.call_node(_node(comfy), model, target_mass=target, **settings)
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


def test_repatch_replaces_and_bad_input_is_a_node_error(comfy, wan):
    twice = _patch(comfy, _patch(comfy, wan, 0.9), 1.0)
    assert torch.equal(_sample(comfy, twice), _sample(comfy, wan))
    with pytest.raises(Exception, match="Sparse Attention \\(hasten\\).*supports models whose attention") as err:
        _patch(comfy, object(), 0.9)
    assert type(err.value).__name__ == "UnsupportedModelError"
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        _patch(comfy, wan, 0.9, block_size=48)


def test_schema_has_tooltips(comfy):
    schema = _node(comfy).GET_SCHEMA()
    assert schema.description and all(getattr(i, "tooltip", None) for i in schema.inputs)
    assert all(o.tooltip for o in schema.outputs)


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_other_families_engage_and_stay_close(comfy, kind):
    model = ce.tiny_sd15() if kind == "sd15" else ce.tiny_sd3()
    size = 32 if kind == "sd15" else 16  # SD1.x: 1024 then 256 self-attention tokens; SD3: 64 + 8 text tokens
    lat = ce.latent(kind, size=size)
    base = ce.run_ksampler(comfy, model, kind, steps=STEPS, lat=lat)
    off = _patch(comfy, model, 1.0)
    assert torch.equal(ce.run_ksampler(comfy, off, kind, steps=STEPS, lat=lat), base)
    patched = _patch(comfy, model, 0.9)
    out = ce.run_ksampler(comfy, patched, kind, steps=STEPS, lat=lat)
    st = _stats(comfy, patched)
    assert st.sparse_calls > 0 and st.search_calls > 0 and not st.fallbacks
    holder = patched.model_options["transformer_options"]["hasten_sparse_attention"]
    assert holder.joint == (kind == "sd3") and "blocks kept" in holder.stats_text()
    rel = float((out - base).abs().max() / base.abs().max())
    assert rel <= 0.05, rel


def test_no_effect_is_said_on_the_node_and_in_the_log(comfy, wan, caplog):
    import logging

    patched = _patch(comfy, wan, 0.9, min_seq_len=1 << 20)  # every sequence shorter: nothing can go sparse
    with caplog.at_level(logging.WARNING, logger="hasten"):
        _sample(comfy, patched)
    holder = patched.model_options["transformer_options"]["hasten_sparse_attention"]
    assert "no effect" in holder.stats_text() and "min_seq_len" in holder.stats_text()
    assert any("Sparse Attention (hasten)" in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)
