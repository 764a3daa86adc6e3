"""``hasten bench --parallel N`` and ``hasten bench --compile``: hasten under context parallelism and torch.compile.

``--parallel N``: the embedded model in one process, then on N ranks of diffusers' own context parallelism
(``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=N))``, gloo on CPU / nccl on CUDA,
spawned here), for the baseline and hasten's main variants. On the ranks each variant gets its own pipeline,
hasten enabled *before* ``enable_parallelism`` (the order the block caches need). Each variant's N-rank images
are compared with its single-process images (PSNR; ``inf`` = identical) and timed against the single-process run.

``--compile``: the eager baseline, the compiled baseline and compiled + hasten variants, interleaved by the
bench runner. The transformer's call is compiled once (``torch.compile(transformer._call_impl)``, what
``nn.Module.compile`` does) and switched on/off per variant, so every repeat reuses the compiled graphs; one
untimed warm-up generation per variant compiles before timing. The graphs compiled during the timed
repeats are counted (0 = no recompilation per step or per run).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import metrics
from . import variants as V
from .variants import Variant, adaptive_guidance, baseline, combo, hasten_easycache, sparse_attention

# the variants both modes compare, built from the run's step count (rebuilt by name in every spawned rank:
# variants hold closures). One row per feature of the README's compatibility table.
MAIN_VARIANTS: dict[str, Callable[[int], Variant]] = {
    "baseline": lambda steps: baseline(),
    "hasten-easycache@0.2": lambda steps: hasten_easycache(0.2),
    "hasten-ag@0.993": lambda steps: adaptive_guidance(0.993),
    "hasten-sparse@0.95": lambda steps: sparse_attention(0.95),
    "hasten-easycache+ag": lambda steps: combo("hasten-easycache+ag", hasten_easycache(0.2), adaptive_guidance(0.993)),
    "hasten-bottleneck@0.5": lambda steps: V.bottleneck(0.5),
    "hasten-delta-dit@2": lambda steps: V.delta_dit(2),
    "hasten-profiling-dit@0.3-r2": lambda steps: V.profiling_dit(0.3),
    "hasten-sada@1": lambda steps: V.sada(1),
    # calibrated once per process (each rank of --parallel calibrates its own copy, outside the timed loop)
    "hasten-cachequant-int8@60%": lambda steps: V.cachequant("int8", max(2, round(0.6 * steps)), steps),
}


@dataclass
class ParallelRow:
    """One variant on 1 process vs. N ranks (speed-ups against the single-process run of the same variant
    and of the baseline; PSNR of the N-rank images against the single-process images)."""

    name: str
    ranks: int
    single_s: float | None = None
    parallel_s: float | None = None
    speedup_vs_single: float | None = None
    speedup_vs_single_baseline: float | None = None
    psnr_vs_single: float | None = None
    psnr_vs_single_baseline: float | None = None
    ranks_agree: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_run(pipe: Any, generate: Callable[[Any, int], torch.Tensor], seeds: Sequence[int],
               res: dict[str, Any]) -> None:
    """One timed pass over ``seeds``: append its wall time to ``res["times"]``, keep the first pass's images."""
    imgs, elapsed = [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        imgs.append(generate(pipe, seed))
        elapsed += time.perf_counter() - t0
    res["times"].append(elapsed)
    if res["images"] is None:
        res["images"] = torch.cat(imgs).float().cpu()


def _measure(pipe: Any, names: Sequence[str], generate: Callable[[Any, int], torch.Tensor], seeds: Sequence[int],
             repeats: int, steps: int) -> dict[str, dict[str, Any]]:
    """Interleaved A B C A B C ... timing; the first repeat's images are kept. Per name: times, images, error."""
    variants = {n: MAIN_VARIANTS[n](steps) for n in names}
    out: dict[str, dict[str, Any]] = {n: {"times": [], "images": None, "error": None} for n in names}
    for _ in range(repeats):
        for name, v in variants.items():
            res = out[name]
            if res["error"]:
                continue
            try:
                v.apply(pipe)
                _timed_run(pipe, generate, seeds, res)
            except Exception as exc:  # noqa: BLE001 - report, keep going with the other variants
                res["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                try:
                    v.remove(pipe)
                except Exception:  # noqa: BLE001
                    pass
    return out


def _digits_generate(digits: Sequence[int], steps: int, guidance: float) -> Callable[[Any, int], torch.Tensor]:
    from ..embedded import generate_digits

    def generate(pipe: Any, seed: int) -> torch.Tensor:
        return generate_digits(pipe, list(digits), seed=1000 * seed, steps=steps, guidance=guidance)

    return generate


def _parallel_pipes(names: Sequence[str], steps: int, world: int, dev: str) -> tuple[dict[str, Any], dict[str, str]]:
    """One pipeline per variant, hasten enabled *before* ``enable_parallelism``: the block caches (Δ-DiT,
    ProfilingDiT) hook the blocks, which diffusers' sequence split then wraps (enabled after it they are
    refused), and a calibrating variant (CacheQuant) calibrates on the plain model, the same on every rank.
    Returns the pipelines and the variants that failed to set up (name -> error)."""
    from diffusers import ContextParallelConfig

    from ..embedded import load_embedded

    pipes: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            variant = MAIN_VARIANTS[name](steps)
            pipe = load_embedded(device=dev)
            pipe.set_progress_bar_config(disable=True)
            if variant.prepare is not None:
                variant.prepare(pipe, lambda: None)
            variant.apply(pipe)
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            pipes[name] = pipe
        except Exception as exc:  # noqa: BLE001 - a row with the reason, the other variants still run
            errors[name] = f"{type(exc).__name__}: {exc}"
    return pipes, errors


def _measure_pipes(pipes: dict[str, Any], errors: dict[str, str], names: Sequence[str],
                   generate: Callable[[Any, int], torch.Tensor], seeds: Sequence[int], repeats: int
                   ) -> dict[str, dict[str, Any]]:
    """:func:`_measure` over pipelines that each already carry their variant (interleaved A B C A B C ...)."""
    out: dict[str, dict[str, Any]] = {n: {"times": [], "images": None, "error": errors.get(n)} for n in names}
    for _ in range(repeats):
        for name in names:
            res = out[name]
            if res["error"]:
                continue
            try:
                _timed_run(pipes[name], generate, seeds, res)
            except Exception as exc:  # noqa: BLE001 - report, keep going with the other variants
                res["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _rank_main(rank: int, world: int, init: str, out: str, names: list[str], digits: list[int], steps: int,
               guidance: float, seeds: list[int], repeats: int, device: str, threads: int) -> None:
    """One rank of the N-rank run (spawned): one pipeline per variant (hasten enabled, then diffusers' Ulysses
    over ``world`` ranks), timed interleaved."""
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    if not cuda:  # diffusers places a rank on rank % torch.accelerator.device_count(); a CPU box has none
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    try:
        dev = f"cuda:{rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(rank)
        pipes, errors = _parallel_pipes(names, steps, world, dev)
        res = _measure_pipes(pipes, errors, names, _digits_generate(digits, steps, guidance), seeds, repeats)
        torch.save(res, f"{out}.rank{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _psnr(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return math.inf if torch.equal(a, b) else metrics.psnr(a, b)


def run_parallel(world: int, digits: Sequence[int], steps: int, guidance: float, seeds: Sequence[int],
                 repeats: int = 3, device: str = "cpu", threads: int = 1,
                 names: Sequence[str] = tuple(MAIN_VARIANTS)) -> list[ParallelRow]:
    """The main variants in this process, then on ``world`` spawned ranks (Ulysses); one row per variant."""
    import torch.multiprocessing as mp

    from ..embedded import load_embedded

    if world < 2:
        raise ValueError(f"--parallel needs at least 2 ranks, got {world}")
    if device.startswith("cuda") and torch.cuda.device_count() < world:
        raise ValueError(f"--parallel {world} on {device} needs {world} CUDA devices, found {torch.cuda.device_count()}")
    torch.set_num_threads(threads)
    names = list(names)
    pipe = load_embedded(device=device)
    pipe.set_progress_bar_config(disable=True)
    single = _measure(pipe, names, _digits_generate(digits, steps, guidance), list(seeds), repeats, steps)
    del pipe
    with tempfile.TemporaryDirectory(prefix="hasten-parallel-") as tmp:
        out, store = os.path.join(tmp, "ranks.pt"), os.path.join(tmp, "rendezvous")
        mp.spawn(_rank_main, args=(world, f"file://{store}", out, names, list(digits), steps, guidance, list(seeds),
                                   repeats, device, threads), nprocs=world, join=True)
        ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]
    base = single["baseline"] if "baseline" in single else None
    base_s = statistics.median(base["times"]) if base and base["times"] else None
    rows = []
    for name in names:
        s, r0 = single[name], ranks[0][name]
        row = ParallelRow(name, world, error=s["error"] or next((r[name]["error"] for r in ranks if r[name]["error"]),
                                                                  None))
        if row.error is None:
            row.single_s = statistics.median(s["times"])
            row.parallel_s = statistics.median(r0["times"])
            row.speedup_vs_single = row.single_s / row.parallel_s
            row.speedup_vs_single_baseline = base_s / row.parallel_s if base_s else None
            row.psnr_vs_single = _psnr(r0["images"], s["images"])
            row.psnr_vs_single_baseline = _psnr(r0["images"], base["images"] if base else None)
            row.ranks_agree = all(torch.equal(r[name]["images"], r0["images"]) for r in ranks[1:])
        rows.append(row)
    return rows


def parallel_table(rows: Sequence[ParallelRow]) -> str:
    """Terminal table of :func:`run_parallel`'s rows."""
    def f(v: Any, fmt: str) -> str:
        if v is None:
            return "-"
        return "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)

    head = ["variant", "1 proc s", f"{rows[0].ranks if rows else 'N'} ranks s", "vs 1 proc", "vs 1-proc base",
            "PSNR vs 1 proc", "PSNR vs base", "ranks agree"]
    body = [[r.name, f(r.single_s, "{:.3f}"), f(r.parallel_s, "{:.3f}"), f(r.speedup_vs_single, "{:.2f}x"),
             f(r.speedup_vs_single_baseline, "{:.2f}x"), f(r.psnr_vs_single, "{:.2f}"),
             f(r.psnr_vs_single_baseline, "{:.2f}"), f(r.ranks_agree, "{}")] if r.error is None
            else [r.name, f"error: {r.error}"] + [""] * 6 for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


# -- compile -------------------------------------------------------------------------------------
def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_variants(pipe: Any, backend: str = "inductor", names: Sequence[str] = tuple(MAIN_VARIANTS),
                     steps: int = 20) -> list[Variant]:
    """The eager baseline, then ``compiled`` and ``compiled+<variant>`` for each name (switching the compiled
    call of ``pipe.transformer`` on and off), each warmed up once before timing; ``settings["graphs_timed"]``
    is filled after the bench with the graphs compiled during its timed repeats."""
    tr = pipe.transformer
    compiled_call = torch.compile(tr._call_impl, backend=backend)
    timed_start: dict[str, int] = {}

    def on(p: Any) -> None:
        p.transformer._compiled_call_impl = compiled_call

    def off(p: Any) -> None:
        p.transformer._compiled_call_impl = None

    out = [baseline()]
    for name in names:
        inner = MAIN_VARIANTS[name](steps)
        label = "compiled" if name == "baseline" else f"compiled+{name}"
        settings = {"backend": backend, **({"hasten": inner.settings} if name != "baseline" else {})}

        def apply(p: Any, inner: Variant = inner) -> None:
            on(p)
            inner.apply(p)

        def remove(p: Any, inner: Variant = inner) -> None:
            try:
                inner.remove(p)
            finally:
                off(p)

        def prepare(p: Any, generate: Callable[[], Any], apply=apply, remove=remove, label=label) -> None:
            apply(p)
            try:
                t0 = time.perf_counter()
                generate()  # compiles (and, for a calibrating variant, warms) before any timed repeat
                warm[label] = time.perf_counter() - t0
            finally:
                remove(p)
            timed_start[label] = _graphs()

        out.append(Variant(label, "baseline-compiled" if name == "baseline" else "hasten", apply, remove,
                           settings, prepare=prepare))
    warm: dict[str, float] = {}
    out[0].settings["compile"] = {"warm_s": warm, "graphs_before_timing": timed_start}
    return out


def run_compile(pipe: Any, generate: Callable[[Any, int], torch.Tensor], seeds: Sequence[int],
                targets: Sequence[int] | None, repeats: int = 3, backend: str = "inductor", progress: bool = True,
                names: Sequence[str] = tuple(MAIN_VARIANTS), steps: int = 20) -> tuple[list[Any], dict[str, Any]]:
    """Bench rows (eager baseline first) and compile facts: first-generation (compile) seconds per variant and
    the graphs compiled during the timed repeats (must be 0)."""
    from .runner import run_bench

    torch._dynamo.reset()
    variants = compile_variants(pipe, backend, names, steps)
    before = _graphs()
    rows = run_bench(pipe, variants, generate, seeds=list(seeds), targets=targets, repeats=repeats, progress=progress)
    facts = variants[0].settings.pop("compile")
    start = max(facts["graphs_before_timing"].values(), default=before)
    facts["graphs_total"] = _graphs() - before
    facts["graphs_during_timed_repeats"] = _graphs() - start
    return rows, facts


# -- `hasten bench --parallel N` / `--compile [BACKEND]` -----------------------------------------
def run_cli(args: Any) -> int:
    """The ``--parallel`` / ``--compile`` sections of ``hasten bench`` (image model), printed and written as
    ``bench_parallel.json`` / ``bench_compile.json`` in ``--out``."""
    import json
    import platform

    from ..cli import UserError, writable_dir
    from ..embedded import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_embedded
    from .report import table

    if getattr(args, "model", "image") != "image":
        raise UserError("--parallel / --compile bench the image model only (use --model image)")
    only = [n.strip() for n in (getattr(args, "only", None) or "").split(",") if n.strip()]
    unknown = [n for n in only if n not in MAIN_VARIANTS]
    if unknown:
        raise UserError(f"--only: {', '.join(unknown)} not among the --parallel/--compile variants: "
                        f"{', '.join(MAIN_VARIANTS)}")
    names = ["baseline", *[n for n in MAIN_VARIANTS if n in only and n != "baseline"]] if only else list(MAIN_VARIANTS)
    out = writable_dir(args.out)
    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE
    digits = [int(c) for c in (args.digits or "0123456789")]
    seeds, repeats = list(range(args.seeds or 2)), args.repeats or 3
    meta = {"model": "hasten embedded (WanPipeline, digits)", "steps": steps, "guidance": guidance, "digits": digits,
            "seeds": len(seeds), "repeats": repeats, "device": args.device, "threads": args.threads,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if args.parallel:
        t0 = time.perf_counter()
        try:
            prow = run_parallel(args.parallel, digits, steps, guidance, seeds, repeats, args.device, args.threads,
                                names)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        path = out / "bench_parallel.json"
        path.write_text(json.dumps({"meta": {**meta, "ranks": args.parallel, "layout": "ulysses",
                                             "bench_seconds": time.perf_counter() - t0},
                                    "rows": [r.to_dict() for r in prow]}, indent=2, default=str))
        print(f"context parallel (diffusers Ulysses, {args.parallel} ranks, "
              f"{'nccl' if args.device.startswith('cuda') else 'gloo'}) vs. one process:")
        print(parallel_table(prow))
        print(f"wrote {path}\n")
    if args.compile:
        t0 = time.perf_counter()
        pipe = load_embedded(device=args.device)
        pipe.set_progress_bar_config(disable=True)
        gen = _digits_generate(digits, steps, guidance)
        rows, facts = run_compile(pipe, gen, seeds, digits, repeats, args.compile, not args.no_progress, names,
                                  steps)
        path = out / "bench_compile.json"
        path.write_text(json.dumps({"meta": {**meta, "backend": args.compile, **facts,
                                             "bench_seconds": time.perf_counter() - t0},
                                    "rows": [r.to_dict() for r in rows]}, indent=2, default=str))
        print(f"torch.compile (backend {args.compile}) of the transformer, interleaved; speed-up and PSNR against "
              "the EAGER baseline:")
        print(table(rows))
        warm = ", ".join(f"{k} {v:.1f} s" for k, v in facts["warm_s"].items())
        print(f"first (compiling) generation: {warm}; graphs compiled: {facts['graphs_total']} in all, "
              f"{facts['graphs_during_timed_repeats']} during the timed repeats")
        print(f"wrote {path}")
    return 0
