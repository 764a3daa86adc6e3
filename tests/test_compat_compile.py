"""hasten's features under torch.compile: same output as eager, bounded graphs, no graph break per step.

hasten's hooks run outside the compiled region (pipelines/compat.py moves ``transformer.compile()`` or a
``torch.compile(transformer)`` wrapper made after the hooks onto the hook-free forward). A counting dynamo
backend (runs the captured graph eagerly: tests dynamo, not inductor's code generation) counts every graph
compiled over two runs; dynamo's own counters count graph breaks. Tiny Wan pipeline, 10 steps, CFG.
"""

from __future__ import annotations

import families as F
import pytest
import torch
import torch._dynamo
from graph_counter import GraphCounter as CountingBackend
from torch._dynamo.utils import counters

import hasten

import tiny_pipes

SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")
FEATURES = {
    "base": lambda p: None,
    "easycache": lambda p: p.enable_easycache(threshold=0.2),
    "ag": lambda p: p.enable_adaptive_guidance(mode="ag", threshold=0.993),
    "sparse": lambda p: p.enable_sparse_attention(**SPARSE),
    "int8": lambda p: hasten.quantize_(p.transformer, "int8"),
}
# (feature, how the model is compiled, compiled before or after the feature is enabled)
CASES = [("base", "module", "before"), ("easycache", "module", "before"), ("easycache", "module", "after"),
         ("easycache", "wrapper", "after"), ("easycache", "wrapper", "before"), ("ag", "module", "after"),
         ("sparse", "module", "after"), ("int8", "module", "after")]
MAX_GRAPHS = 2  # base model alone: 2 (the first step's latent has other strides than the next ones)
MAX_GRAPHS_SPARSE = 16  # the segments between 4 eagerly run attention calls, x2 as for the base model




def _run(pipe, kw) -> tuple[torch.Tensor, str]:
    """Output and hasten's per-branch compute/reuse timeline (the rows the hooks let through to the model;
    a block hook counting them would sit inside the compiled region and recompile it on every count)."""
    out = tiny_pipes.run(pipe, kw)
    return out, hasten.summary(pipe)


def _rows(pipe, kw) -> int:
    with F.FirstBlockCounter(pipe) as c:
        tiny_pipes.run(pipe, kw)
        return c.take()[0]


@pytest.mark.parametrize(("feature", "how", "order"), CASES)
def test_compiled_feature_matches_eager(feature: str, how: str, order: str) -> None:
    torch.set_num_threads(1)
    pipe, kw = tiny_pipes.wan()
    FEATURES[feature](pipe)
    ref, ref_rows = _run(pipe, kw)

    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend()
    pipe, kw = tiny_pipes.wan()
    original = pipe.transformer

    def compile_() -> None:
        if how == "module":
            pipe.transformer.compile(backend=backend)
        else:
            pipe.transformer = torch.compile(pipe.transformer, backend=backend)

    if order == "before":
        compile_()
        FEATURES[feature](pipe)
    else:
        FEATURES[feature](pipe)
        compile_()
    out, rows = _run(pipe, kw)
    first = backend.graphs
    out2, _ = _run(pipe, kw)
    breaks = dict(counters["graph_break"])
    assert backend.graphs > 0, "nothing was compiled"
    assert first <= (MAX_GRAPHS_SPARSE if feature == "sparse" else MAX_GRAPHS) and backend.graphs == first, f"graphs: {first} in run 1, {backend.graphs} after run 2"
    if feature == "sparse":  # its processors run eagerly (torch.compiler.disable): one break per attention call
        assert all("skip" in k or "disable" in k for k in breaks), list(breaks)[:3]
    else:
        assert not breaks, list(breaks)[:3]
    assert rows == ref_rows  # the same compute/reuse and guidance decisions
    assert (out - ref).abs().max() <= 1e-5 and (out2 - ref).abs().max() <= 1e-5
    if feature in ("easycache", "ag"):  # eagerly, the same feature skips work below the hooks
        eager, kw2 = tiny_pipes.wan()
        FEATURES[feature](eager)
        assert _rows(eager, kw2) < 2 * tiny_pipes.STEPS

    if feature in ("easycache", "ag", "sparse"):  # disabling restores the module's own forward / compile state
        {"easycache": pipe.disable_easycache, "ag": pipe.disable_adaptive_guidance,
         "sparse": pipe.disable_sparse_attention}[feature]()
        assert "_hasten_moved_compile" not in original.__dict__
        if how == "module":
            assert original._compiled_call_impl is not None
        plain, _ = _run(pipe, kw)
        base, _ = _run(*tiny_pipes.wan())
        assert (plain - base).abs().max() <= 1e-5
