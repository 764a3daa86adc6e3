"""Runs hasten's features on the embedded model in one process or over 2 gloo ranks of diffusers' context
parallelism, and saves each image plus the batch size of every call of the first transformer block (the
compute/reuse and guidance decisions, counted below every hook).

Usage: ``python tests/parallel_worker.py OUT.pt single|ulysses|ring [feature[@ring|@ulysses] ...]``; the 2-rank
modes write ``OUT.pt.rank0`` and ``OUT.pt.rank1``. Used by
tests/test_parallel.py; standalone so the spawned ranks import nothing from pytest.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import torch

SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")
FEATURES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "base": [],
    "easycache0": [("easycache", {"threshold": 0.0})],
    "easycache0.2": [("easycache", {"threshold": 0.2})],
    "ag": [("guidance", {"mode": "ag", "threshold": 0.993})],
    "sparse": [("sparse", SPARSE)],
    "int8": [("int8", {})],
    "ag+sparse+easycache0.2": [("guidance", {"mode": "ag", "threshold": 0.993}), ("sparse", SPARSE),
                               ("easycache", {"threshold": 0.2})],
    # issue 15's newer features: a scheduler patch that changes the sequence length mid-run, block caches
    # (hooks on the blocks, i.e. inside diffusers' sequence split), step caches
    "bottleneck": [("bottleneck", {})],
    "bottleneck+easycache0.2": [("bottleneck", {}), ("easycache", {"threshold": 0.2})],
    "delta_dit": [("delta_dit", {"interval": 2})],
    # the 2 most stable of 4 blocks: an order picked from profiled values, which must be the same on every rank
    "profiling_dit": [("profiling_dit", {"threshold": 0.5, "max_cached_fraction": 0.5})],
    "sada": [("sada", {})],
    "cachequant": [("cachequant", {})],
    # weight-only int4 and dynamic-activation W8A8 (per-token activation scales: a sequence shard must not change them)
    "int4": [("int4", {})],
    "w8a8": [("w8a8", {})],
}


def run_flux(name: str, parallel: str | None) -> dict[str, Any]:
    """Tiny Flux (its context-parallel plan splits the denoiser's inputs at the root), EasyCache at 0.3.

    ``flux``: the supported order, enable_parallelism first; ``flux-late``: EasyCache first (refused)."""
    import hasten

    import tiny_pipes

    make_embeds = tiny_pipes._embeds
    tiny_pipes._embeds = lambda b, s, d, seed: make_embeds(b, 8, d, seed)  # 8 text tokens: divisible by 2 ranks
    try:
        pipe, kw = tiny_pipes.flux()
    finally:
        tiny_pipes._embeds = make_embeds
    if name == "flux-late":
        pipe.enable_easycache(threshold=0.3, warmup=0.1)
    if parallel is not None:
        from diffusers import ContextParallelConfig

        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    if name == "flux":
        pipe.enable_easycache(threshold=0.3, warmup=0.1)
    calls: list[int] = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, k: calls.append(int(k["hidden_states"].shape[0])), with_kwargs=True)
    out = tiny_pipes.run(pipe, kw, steps=12)
    return {"image": out.detach().float().cpu(), "calls": calls, "summary": hasten.summary(pipe)}


def run_feature(name: str, parallel: str | None) -> dict[str, Any]:
    import hasten

    if name.startswith("flux"):
        return run_flux(name, parallel)
    pipe = hasten.load_embedded()
    for kind, kw in FEATURES[name]:
        if kind == "easycache":
            pipe.enable_easycache(**kw)
        elif kind == "guidance":
            pipe.enable_adaptive_guidance(**kw)
        elif kind == "sparse":
            pipe.enable_sparse_attention(**kw)
        elif kind in ("int8", "int4", "w8a8"):
            hasten.quantize_pipeline(pipe, kind)
        elif kind == "cachequant":  # a fixed schedule (12 of 20 steps), no calibration run
            from hasten.caches.cachequant import CacheQuantPlan

            pipe.enable_cachequant(method="int8", plan=CacheQuantPlan(num_steps=20, computed=(
                0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19)))
        else:  # bottleneck, delta_dit, profiling_dit, sada
            getattr(pipe, f"enable_{kind}" if kind != "bottleneck" else "enable_bottleneck_sampling")(**kw)
    if parallel is not None:
        from diffusers import ContextParallelConfig

        degree = {"ulysses_degree": 2} if parallel == "ulysses" else {"ring_degree": 2}
        if parallel == "ring":  # Ring merges partial results by their LSE, which the "native" backend cannot return
            pipe.transformer.set_attention_backend("_native_flash")
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))
    calls: list[int] = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a, k: calls.append(int(k["hidden_states"].shape[0]))
                                                         if "hidden_states" in k else calls.append(int(a[0].shape[0])),
                                                         with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    out = pipe(prompt="digit 3", generator=gen, output_type="pt").frames
    return {"image": out.detach().float().cpu(), "calls": calls, "summary": hasten.summary(pipe)}


def run_all(names: list[str], parallel: str | None) -> dict[str, Any]:
    """Each name is a feature set of FEATURES, optionally ``name@ring`` / ``name@ulysses`` for that layout."""
    results: dict[str, Any] = {}
    for name in names:
        feature, _, layout = name.partition("@")
        try:
            results[name] = run_feature(feature, (layout or parallel) if parallel is not None else None)
        except Exception as exc:  # recorded, so the test shows which feature failed and why
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    return results


def _rank_main(rank: int, out: str, parallel: str, names: list[str], init: str) -> None:
    torch.set_num_threads(1)
    # diffusers picks the device as rank % torch.accelerator.device_count(); a CPU box has no accelerator.
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.save(run_all(names, parallel), f"{out}.rank{rank}")
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    out, mode, *names = argv
    names = names or list(FEATURES)
    torch.set_num_threads(1)
    if mode == "single":
        torch.save(run_all(names, None), out)
        return
    import torch.multiprocessing as mp

    store = f"{os.path.abspath(out)}.rendezvous"  # gloo's file rendezvous needs a file that does not exist yet
    if os.path.exists(store):
        os.remove(store)
    try:
        mp.spawn(_rank_main, args=(out, mode, names, f"file://{store}"), nprocs=2, join=True)
    finally:
        if os.path.exists(store):
            os.remove(store)


def run_single_and_ranks(tmp: Any, single: list[str], multi: list[str]) -> dict[str, Any]:
    """Run this worker once in one process (``single`` feature names) and once on 2 Ulysses ranks (``multi``),
    concurrently; return ``{"single": results, "ranks": [rank0, rank1]}`` (used by the tests' fixtures)."""
    import subprocess
    from pathlib import Path

    one, two = Path(tmp) / "single.pt", Path(tmp) / "multi.pt"
    procs = [subprocess.Popen([sys.executable, __file__, str(one), "single", *single],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen([sys.executable, __file__, str(two), "ulysses", *multi],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    load = lambda f: torch.load(f, weights_only=False)  # noqa: E731
    return {"single": load(one), "ranks": [load(f"{two}.rank0"), load(f"{two}.rank1")]}


if __name__ == "__main__":
    main(sys.argv[1:])
