"""Sparse attention across the tiny diffusers families of tests/families.py: it engages (sparse calls at the
real attention of the model) or says why not; never a silent no-op; ``disable`` restores exactly."""

from __future__ import annotations

import logging

import families as fam
import pytest
import torch

from hasten import UnsupportedModelError
from hasten.pipelines import disable_sparse_attention, enable_sparse_attention, registry

SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=1, refresh_every=0, min_seq_len=0, backend="torch")
# families whose self-attention is not softmax attention: nothing to sparsify, refused with the reason
NOT_ENGAGED = {"sana": "SanaLinearAttnProcessor2_0"}


@pytest.mark.parametrize("name", fam.NAMES)
def test_sparse_attention_engages_or_says_why(name, caplog):
    pipe, kw = fam.build(name)
    base = fam.call(pipe, kw)
    before = {c: {n: m.processor for n, m in d.named_modules() if callable(getattr(m, "processor", None))}
              for c, d in fam.denoisers(pipe).items()}
    if name in NOT_ENGAGED:
        with pytest.raises(UnsupportedModelError, match=NOT_ENGAGED[name]):
            enable_sparse_attention(pipe, **SPARSE)
        assert "sparse_attention" not in registry.features(pipe)
        assert torch.equal(fam.call(pipe, kw), base)
        return
    with caplog.at_level(logging.INFO, logger="hasten"):
        enable_sparse_attention(pipe, **SPARSE)
        try:
            out = fam.call(pipe, kw)
            stats = registry.stats(pipe)["sparse_attention"]
        finally:
            disable_sparse_attention(pipe)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert sum(st.sparse_calls + st.search_calls for st in stats.values() if st is not None) > 0, stats
    assert all(st is None or not st.fallbacks for st in stats.values()), stats
    assert "sparse attention:" in text and "blocks kept" in text  # the once-per-run line
    assert torch.isfinite(out).all()
    for c, d in fam.denoisers(pipe).items():
        now = {n: m.processor for n, m in d.named_modules() if callable(getattr(m, "processor", None))}
        assert now.keys() == before[c].keys() and all(now[n] is p for n, p in before[c].items())
    assert torch.equal(fam.call(pipe, kw), base)
