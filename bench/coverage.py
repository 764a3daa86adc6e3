"""The model-agnostic coverage matrix: every hasten feature on 30+ tiny diffusers families.

``python -m hasten.bench.coverage [--out FILE] [family ...] [--features f1,f2]`` builds each family of
``tests/families.py`` (random weights, no downloads), runs it once as the baseline, then runs every
feature through its public API and prints a markdown table family x feature:

* ``✓`` works: the off setting is bit-identical to the baseline, the accelerated setting really does
  less work (fewer rows reaching the denoiser's first block, attention blocks skipped, layers quantized,
  fewer elements at a lower resolution) without merging two CFG branches, and ``disable_*`` gives the
  baseline back bit for bit;
* ``unsupported: <reason>``: the feature raised :class:`hasten.UnsupportedModelError` (and the pipeline
  was left exactly as it was);
* ``✗ <problem>``: anything else — a crash, a silent no-op, a wrong result, a disable that does not
  restore. ``tests/test_coverage_matrix.py`` asserts the same cells.

The work is counted by a plain forward pre-hook on the first block of each denoiser and a forward hook
on the denoiser itself (what the pipeline receives), both independent of hasten's own hooks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError

STEPS = 5
FEATURES = ("easycache", "guidance_ag", "guidance_truncate", "sparse_attention", "quant_int8", "bottleneck",
            "delta_dit", "profiling_dit", "sada")
WORKS, UNSUPPORTED, WRONG, CRASH = "works", "unsupported", "wrong", "crash"
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


def families_module() -> Any:
    """``tests/families.py`` (the tiny builders); it lives with the tests, next to this package."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import families

    return families


class CellFailure(AssertionError):
    """The feature ran but did something wrong (no effect, merged branches, not restored)."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CellFailure(msg)


@dataclass
class Cell:
    """One family x feature outcome."""

    family: str
    feature: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    logged: int = 0  # records the "hasten" logger emitted during the accelerated run
    predicted: str = ""  # what hasten.check(pipe) said beforehand: "engages", "unsupported: ...", "error: ..."

    @property
    def ok(self) -> bool:
        return self.status in (WORKS, UNSUPPORTED)

    @property
    def agrees(self) -> bool | None:
        """Whether hasten.check predicted this outcome (None when the cell failed: no outcome to predict)."""
        if not self.ok or not self.predicted:
            return None
        return (self.status == WORKS) == (self.predicted == "engages")

    def short(self) -> str:
        warn = "" if self.agrees is not False else f" ⚠ check predicted {_clip(self.predicted, 40)}"
        if self.status == WORKS:
            quiet = "" if self.logged else ", no log"
            return "✓" + (f" ({self.detail}{quiet})" if self.detail else "") + warn
        if self.status == UNSUPPORTED:
            return "unsupported: " + _clip(self.detail, 70) + warn
        return "✗ " + _clip(self.detail, 90)


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------- probing one generation
def _main(result: Any) -> torch.Tensor | None:
    """The prediction tensor of a denoiser output (tensor, tuple, BaseOutput, list of per-sample tensors)."""
    if isinstance(result, (tuple, list)) and result:
        first = result[0]
        if isinstance(result, list) and all(isinstance(r, torch.Tensor) for r in result):
            try:
                return torch.stack([r.detach() for r in result])
            except RuntimeError:
                return None
        return _main(first)
    if isinstance(result, torch.Tensor):
        return result.detach()
    sample = getattr(result, "sample", None)
    if sample is not None:
        return _main(sample)
    return None


def _timestep_key(args: tuple, kwargs: dict) -> Any:
    t = kwargs.get("timestep", kwargs.get("t"))
    if t is None and len(args) > 1:
        t = args[1]
    if isinstance(t, torch.Tensor):
        return round(float(t.flatten()[0]), 5) if t.numel() else None
    if isinstance(t, (int, float)):
        return round(float(t), 5)
    return None


@dataclass
class Probe:
    """What one generation did: its output and the work that really reached the denoisers."""

    out: torch.Tensor
    rows: int
    calls: int
    elems: int
    merged: int  # pairs of rows of one step whose denoiser outputs are exactly equal (merged branches)
    step_rows: list[int] = field(default_factory=list)  # denoiser output rows the pipeline received per step
    first: torch.Tensor | None = None  # the first denoiser call's output (its inputs equal the baseline's)


class _Recorder:
    """Forward hooks: rows/elements at the first block, (timestep, output rows) per denoiser call."""

    def __init__(self, pipe: Any, fam: Any) -> None:
        self.rows = self.calls = self.elems = 0
        self.steps: list[tuple[Any, list[torch.Tensor]]] = []
        self.handles = []
        for den in fam.denoisers(pipe).values():
            self.handles.append(fam.first_block(den).register_forward_pre_hook(self._block, with_kwargs=True))
            self.handles.append(den.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(den.register_forward_hook(self._post, with_kwargs=True))
        self._t: list[Any] = []

    def _block(self, module: Any, args: tuple, kwargs: dict) -> None:
        for v in (kwargs.get("hidden_states"), *args, *kwargs.values()):
            if isinstance(v, torch.Tensor):
                self.rows += int(v.shape[0])
                self.elems += int(v.numel())
                break
        self.calls += 1

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._t.append(_timestep_key(args, kwargs))

    def _post(self, module: Any, args: tuple, kwargs: dict, result: Any) -> None:
        t = self._t.pop() if self._t else None
        out = _main(result)
        rows = [] if out is None else [r.float().flatten() for r in out]
        if self.steps and t is not None and self.steps[-1][0] == t:
            self.steps[-1][1].extend(rows)
        else:
            self.steps.append((t, rows))

    def merged(self) -> int:
        n = 0
        for _, rows in self.steps:
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    if rows[i].shape == rows[j].shape and torch.equal(rows[i], rows[j]):
                        n += 1
        return n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def probe(fam: Any, pipe: Any, kwargs: dict, steps: int = STEPS) -> Probe:
    rec = _Recorder(pipe, fam)
    try:
        out = fam.call(pipe, kwargs, steps=steps)
    finally:
        rec.remove()
    first = torch.stack(rec.steps[0][1]) if rec.steps and rec.steps[0][1] else None
    return Probe(out, rec.rows, rec.calls, rec.elems, rec.merged(), [len(r) for _, r in rec.steps], first)


class _LogCount(logging.Handler):
    """Counts what the "hasten" logger says during a cell; keeps the warnings (a no-op may be warned)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())


# --------------------------------------------------------------------------- one family
@dataclass
class FamilyRun:
    """A built family, its baseline, and whether the pipeline must be rebuilt before the next cell."""

    name: str
    pipe: Any = None
    kwargs: dict = field(default_factory=dict)
    base: Probe | None = None
    error: str | None = None
    dirty: bool = False
    check: Any = None  # hasten.check(pipe) made on the fresh pipeline, before any feature

    def rebuild(self) -> None:
        fam = families_module()
        self.pipe, self.kwargs = fam.build(self.name)
        self.dirty = False


def prepare(name: str, steps: int = STEPS) -> FamilyRun:
    """Build family ``name`` and run its baseline (an error is kept, every cell then reports it)."""
    fr = FamilyRun(name)
    try:
        fr.rebuild()
        fr.base = probe(families_module(), fr.pipe, fr.kwargs, steps)
        try:
            from ..pipelines.check import check

            fr.check = check(fr.pipe)
        except Exception as exc:  # noqa: BLE001 - a failing check is reported in every cell
            fr.check = f"error: hasten.check raised {type(exc).__name__}: {exc}"
        again = families_module().call(fr.pipe, fr.kwargs, steps=steps)
        if not torch.equal(again, fr.base.out):
            fr.error = "baseline is not deterministic, or hasten.check(pipe) changed the pipeline"
    except Exception as exc:  # noqa: BLE001 - reported in every cell of the family
        fr.error = f"build/baseline failed: {type(exc).__name__}: {exc}"
    return fr


def _same(p: Probe, base: Probe) -> bool:
    return p.out.shape == base.out.shape and torch.equal(p.out, base.out)


def _diff(p: Probe, base: Probe) -> str:
    if p.out.shape != base.out.shape:
        return f"shape {tuple(p.out.shape)} vs {tuple(base.out.shape)}"
    return f"max abs diff {float((p.out - base.out).abs().max()):.3g}"


def _off_identical(p: Probe, base: Probe, what: str) -> None:
    _require(_same(p, base), f"{what} is not bit-identical to the baseline ({_diff(p, base)})")
    _require(p.rows == base.rows, f"{what} changed the real work ({p.rows} rows vs {base.rows})")


def _not_merged(p: Probe, base: Probe) -> None:
    _require(p.merged <= base.merged,
             f"two CFG branches got the same denoiser output at {p.merged - base.merged} step-pairs (merged branches)")


def _finite_same_shape(p: Probe, base: Probe) -> None:
    _require(p.out.shape == base.out.shape, f"output shape {tuple(p.out.shape)} != baseline {tuple(base.out.shape)}")
    _require(bool(torch.isfinite(p.out).all()), "output has NaN/inf")


def _restored(p: Probe, base: Probe, what: str, pipe: Any = None) -> None:
    _require(_same(p, base), f"after {what} the output is not the baseline ({_diff(p, base)})")
    if pipe is None:
        return
    fam = families_module()
    for comp, den in fam.denoisers(pipe).items():
        for mod in den.modules():
            reg = getattr(mod, "_diffusers_hook", None)
            names = [n for n in getattr(reg, "hooks", {}) if "hasten" in n]
            _require(not names, f"after {what} hasten hooks remain on {comp}: {names}")
    sched = getattr(pipe, "scheduler", None)
    left = [a for a in ("set_timesteps", "step") if sched is not None and a in vars(sched)]
    _require(not left, f"after {what} the scheduler still has patched {left}")


# Each protocol: (enable-off, enable-on, check-on, disable). Returns a short detail for a working cell.
def _easycache(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
    pipe, base = fr.pipe, fr.base
    pipe.enable_easycache(threshold=0.0)
    _off_identical(probe(fam, pipe, fr.kwargs, steps), base, "threshold=0")
    pipe.enable_easycache(threshold=10.0, warmup=0.2, final_steps=1)
    logs.count = 0
    on = probe(fam, pipe, fr.kwargs, steps)
    _finite_same_shape(on, base)
    _require(on.rows < base.rows, f"silent no-op: {on.rows} rows at the first block vs {base.rows} baseline")
    _not_merged(on, base)
    pipe.disable_easycache()
    _restored(probe(fam, pipe, fr.kwargs, steps), base, "disable_easycache", pipe)
    return f"rows {on.rows}/{base.rows}"


def _sada(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
    pipe, base = fr.pipe, fr.base
    pipe.enable_sada(max_interval=0)
    _off_identical(probe(fam, pipe, fr.kwargs, steps), base, "max_interval=0")
    pipe.enable_sada(max_interval=1, threshold=10.0, start=0.0, end=1.0, final_steps=0)  # skip when allowed
    logs.count = 0
    on = probe(fam, pipe, fr.kwargs, steps)
    _finite_same_shape(on, base)
    _require(on.rows < base.rows, f"silent no-op: {on.rows} rows at the first block vs {base.rows} baseline")
    _not_merged(on, base)
    pipe.disable_sada()
    _restored(probe(fam, pipe, fr.kwargs, steps), base, "disable_sada", pipe)
    return f"rows {on.rows}/{base.rows}"


def _guidance(mode: str) -> Callable:
    def run(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
        pipe, base = fr.pipe, fr.base
        off = dict(mode="ag", threshold=2.0) if mode == "ag" else dict(mode="truncate", truncate=1.0)
        on = dict(mode="ag", threshold=0.01, min_steps=1) if mode == "ag" else dict(mode="truncate", truncate=0.4)
        pipe.enable_adaptive_guidance(**off)
        _off_identical(probe(fam, pipe, fr.kwargs, steps), base, f"{mode} off ({off})")
        pipe.enable_adaptive_guidance(**on)
        logs.count = 0
        p = probe(fam, pipe, fr.kwargs, steps)
        _finite_same_shape(p, base)
        _require(p.rows < base.rows, f"silent no-op: {p.rows} rows at the first block vs {base.rows} baseline")
        _require(not torch.equal(p.out, base.out), "rows were dropped but the output is unchanged")
        pipe.disable_adaptive_guidance()
        _restored(probe(fam, pipe, fr.kwargs, steps), base, "disable_adaptive_guidance", pipe)
        return f"rows {p.rows}/{base.rows}"

    return run


SPARSE_SMALL = dict(block_size=16, min_seq_len=16, warmup_steps=1, refresh_every=0)


def _processors(pipe: Any, fam: Any) -> dict[str, Any]:
    out = {}
    for comp, den in fam.denoisers(pipe).items():
        procs = getattr(den, "attn_processors", None)
        if isinstance(procs, dict):
            out.update({f"{comp}.{k}": id(v) for k, v in procs.items()})
    return out


def _sparse(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
    from ..pipelines import stats

    pipe, base = fr.pipe, fr.base
    before = _processors(pipe, fam)
    pipe.enable_sparse_attention(target_mass=1.0, **SPARSE_SMALL)
    _off_identical(probe(fam, pipe, fr.kwargs, steps), base, "target_mass=1.0")
    pipe.enable_sparse_attention(target_mass=0.3, **SPARSE_SMALL)
    logs.count = 0
    p = probe(fam, pipe, fr.kwargs, steps)
    _finite_same_shape(p, base)
    _not_merged(p, base)
    st = stats(pipe).get("sparse_attention") or {}
    kept = sum(int(getattr(s, "blocks_kept", 0) or 0) for s in st.values() if s is not None)
    total = sum(int(getattr(s, "blocks_total", 0) or 0) for s in st.values() if s is not None)
    sparse_calls = sum(int(getattr(s, "sparse_calls", 0) or 0) for s in st.values() if s is not None)
    said = "; ".join(s.summary() if hasattr(s, "summary") else str(s) for s in st.values())
    _require(sparse_calls > 0 and total > 0, f"silent no-op: no sparse attention call ({said})")
    _require(kept < total, f"silent no-op: every block kept ({kept}/{total})")
    pipe.disable_sparse_attention()
    _restored(probe(fam, pipe, fr.kwargs, steps), base, "disable_sparse_attention", pipe)
    _require(_processors(pipe, fam) == before, "disable_sparse_attention did not put the original processors back")
    return f"blocks {kept}/{total}"


def _param_sum(pipe: Any, fam: Any) -> dict[str, Any]:
    return {f"{c}.{k}": (tuple(v.shape), v.dtype, float(v.double().sum()))
            for c, den in fam.denoisers(pipe).items() for k, v in den.state_dict().items()}


def _quant(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
    from .. import Int8WeightOnlyConfig
    from ..pipelines import stats

    pipe, base = fr.pipe, fr.base
    before = _param_sum(pipe, fam)
    calib = {k: v for k, v in fr.kwargs.items() if k != "output_type"}
    logs.count = 0
    pipe.quantize(Int8WeightOnlyConfig(), calibration_prompts=[calib], steps=2)
    reports = stats(pipe).get("quant") or {}
    n = sum(len(getattr(r, "quantized", []) or []) for r in reports.values())
    _require(n > 0, "silent no-op: no linear layer quantized")
    p = probe(fam, pipe, fr.kwargs, steps)
    _finite_same_shape(p, base)
    _not_merged(p, base)
    # quantization error of the denoiser itself: its first call sees exactly the baseline's inputs
    # (the final output also carries the sampler's amplification, e.g. DDPM's learned variance)
    _require(p.first is not None and base.first is not None and p.first.shape == base.first.shape,
             "could not compare the first denoiser output with the baseline's")
    ref = base.first
    rel = float((p.first - ref).norm() / (ref.norm() + 1e-12))
    _require(rel < 0.05, f"first denoiser output too far from the baseline's (relative L2 error {rel:.3f})")
    _require(not torch.equal(p.first, ref), "quantized output bit-identical to the baseline (layers not used?)")
    pipe.dequantize()
    _restored(probe(fam, pipe, fr.kwargs, steps), base, "dequantize", pipe)
    _require(_param_sum(pipe, fam) == before, "dequantize did not restore the original weights")
    return f"{n} layers, rel err {rel:.3f}"


def _bottleneck(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
    pipe, base = fr.pipe, fr.base
    pipe.enable_bottleneck_sampling(scales=(1.0, 1.0, 1.0), boundaries=(0.3, 0.7))
    _off_identical(probe(fam, pipe, fr.kwargs, steps), base, "scales all 1.0")
    pipe.enable_bottleneck_sampling(scales=(1.0, 0.5, 1.0), boundaries=(0.3, 0.7))
    logs.count = 0
    p = probe(fam, pipe, fr.kwargs, steps)
    _finite_same_shape(p, base)
    _not_merged(p, base)
    _require(p.elems < base.elems,
             f"silent no-op: {p.elems} elements reached the first block vs {base.elems} at full resolution")
    pipe.disable_bottleneck_sampling()
    _restored(probe(fam, pipe, fr.kwargs, steps), base, "disable_bottleneck_sampling", pipe)
    return f"elems {p.elems}/{base.elems}"


def _block_cache(feature: str, off: dict, on: dict) -> Callable:
    """Block caches call every block but skip its inside: work is counted at each block's first child holding a
    linear layer (its attention), by plain pre-hooks of this harness."""

    def run(fam: Any, fr: FamilyRun, steps: int, logs: _LogCount) -> str:
        from ..pipelines.blockcache import find_blocks

        pipe, base = fr.pipe, fr.base
        rows = [0]
        handles = []
        for den in fam.denoisers(pipe).values():
            try:
                blocks = find_blocks(den)[1]
            except UnsupportedModelError:
                continue
            for b in blocks:
                child = next((c for c in b.children() if any(isinstance(m, torch.nn.Linear) for m in c.modules())), b)
                handles.append(child.register_forward_pre_hook(
                    lambda m, a, kw: rows.__setitem__(0, rows[0] + next(
                        int(v.shape[0]) for v in (*a, *kw.values()) if isinstance(v, torch.Tensor))), with_kwargs=True))
        try:
            getattr(pipe, f"enable_{feature}")(**off)
            rows[0] = 0
            _off_identical(probe(fam, pipe, fr.kwargs, steps), base, f"{feature} off ({off})")
            base_rows = rows[0]
            getattr(pipe, f"enable_{feature}")(**on)
            logs.count = 0
            rows[0] = 0
            p = probe(fam, pipe, fr.kwargs, steps)
            on_rows = rows[0]
            _finite_same_shape(p, base)
            _not_merged(p, base)
            _require(on_rows < base_rows, f"silent no-op: {on_rows} block rows computed vs {base_rows} baseline")
            getattr(pipe, f"disable_{feature}")()
            _restored(probe(fam, pipe, fr.kwargs, steps), base, f"disable_{feature}", pipe)
        finally:
            for h in handles:
                h.remove()
        return f"block rows {on_rows}/{base_rows}"

    return run


PROTOCOLS: dict[str, Callable] = {
    "easycache": _easycache,
    "guidance_ag": _guidance("ag"),
    "guidance_truncate": _guidance("truncate"),
    "sparse_attention": _sparse,
    "quant_int8": _quant,
    "bottleneck": _bottleneck,
    "delta_dit": _block_cache("delta_dit", dict(interval=1), dict(interval=2, warmup=0.0)),
    "profiling_dit": _block_cache("profiling_dit", dict(threshold=0.0), dict(threshold=10.0, profile=0.2,
                                                                                      final_steps=0)),
    "sada": _sada,
}
DISABLE = {
    "easycache": "disable_easycache", "guidance_ag": "disable_adaptive_guidance",
    "guidance_truncate": "disable_adaptive_guidance", "sparse_attention": "disable_sparse_attention",
    "quant_int8": "dequantize", "bottleneck": "disable_bottleneck_sampling",
    "delta_dit": "disable_delta_dit", "profiling_dit": "disable_profiling_dit", "sada": "disable_sada",
}


def _location(exc: BaseException) -> str:
    """Where it broke: the innermost frame, and the innermost hasten frame outside this harness."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    here = Path(__file__).resolve()
    root = here.parent.parent
    where = [f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"]
    for fr in reversed(frames):
        path = Path(fr.filename).resolve()
        if path != here and root in path.parents and "tests" not in path.parts:
            loc = f"{path.relative_to(root)}:{fr.lineno}"
            if not where[0].startswith(path.name + ":"):
                where.append(loc)
            else:
                where[0] = loc
            break
    return " [" + " via ".join(where) + "]"


def run_cell(fr: FamilyRun, feature: str, steps: int = STEPS) -> Cell:
    """Run one family x feature cell on ``fr`` (rebuilding the pipeline first if a cell left it dirty)."""
    fam = families_module()
    if fr.error is not None:
        return Cell(fr.name, feature, CRASH, fr.error)
    if fr.dirty:
        fr.rebuild()
    logs = _LogCount()
    logger = logging.getLogger("hasten")
    logger.addHandler(logs)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        detail = PROTOCOLS[feature](fam, fr, steps, logs)
        cell = Cell(fr.name, feature, WORKS, detail)
    except UnsupportedModelError as exc:
        cell = Cell(fr.name, feature, UNSUPPORTED, str(exc))
        try:  # all or nothing: a refusal must leave the pipeline exactly as it was
            getattr(fr.pipe, DISABLE[feature])()
            after = probe(fam, fr.pipe, fr.kwargs, steps)
            if not _same(after, fr.base):
                cell = Cell(fr.name, feature, WRONG, f"refused ({_clip(exc, 60)}) but left the pipeline modified")
        except Exception as exc2:  # noqa: BLE001
            cell = Cell(fr.name, feature, CRASH, f"after refusal: {type(exc2).__name__}: {exc2}")
    except CellFailure as exc:
        said = f" — warned: {logs.warnings[-1]}" if logs.warnings and "no-op" in str(exc) else ""
        cell = Cell(fr.name, feature, WRONG, str(exc) + said)
    except Exception as exc:  # noqa: BLE001 - a crash is a result here
        cell = Cell(fr.name, feature, CRASH, f"{type(exc).__name__}: {exc}{_location(exc)}")
    finally:
        logger.removeHandler(logs)
        logger.setLevel(old_level)
    cell.seconds = time.perf_counter() - t0
    cell.logged = logs.count
    cell.predicted = _prediction(fr.check, feature)
    if not cell.ok:  # a failed cell may have left hooks or patches behind: the next cell gets a fresh build
        fr.dirty = True
    return cell


CHECK_NAME = {"easycache": "easycache", "guidance_ag": "adaptive_guidance", "guidance_truncate": "adaptive_guidance",
              "sparse_attention": "sparse_attention", "quant_int8": "quantization", "bottleneck": "bottleneck",
              "delta_dit": "block_cache", "profiling_dit": "block_cache",
              "sada": "easycache"}  # SADA runs on EasyCache's denoiser hook: same support surface


def _prediction(report: Any, feature: str) -> str:
    if report is None:
        return ""
    if isinstance(report, str):
        return report
    fc = report.features.get(CHECK_NAME[feature])
    if fc is None:
        return "error: hasten.check has no entry for this feature"
    return "engages" if fc.engages else f"{fc.status}: {fc.reason}"


_CELLS: dict[tuple[str, str], Cell] = {}
_FAMILY: dict[str, FamilyRun] = {}
_BASELINES: dict[str, tuple[str | None, Probe | None]] = {}


def baseline(family: str, steps: int = STEPS) -> tuple[str | None, Probe | None]:
    """(build error, baseline probe) of ``family``, memoised for the process."""
    if family not in _BASELINES:
        fr = _FAMILY.get(family) or prepare(family, steps)
        _BASELINES[family] = (fr.error, fr.base)
    return _BASELINES[family]


def cell(family: str, feature: str, steps: int = STEPS) -> Cell:
    """One cell, memoised for the process (the tests of the matrix and of hasten.check share the runs).

    Only the family in use is kept built; ask for the cells family by family.
    """
    key = (family, feature)
    if key not in _CELLS:
        if family not in _FAMILY:
            _FAMILY.clear()
            _FAMILY[family] = fr = prepare(family, steps)
            _BASELINES[family] = (fr.error, fr.base)
        _CELLS[key] = run_cell(_FAMILY[family], feature, steps)
    return _CELLS[key]


def run_matrix(families: list[str] | None = None, features: tuple[str, ...] = FEATURES, steps: int = STEPS,
               progress: Callable[[Cell], None] | None = None) -> list[Cell]:
    """Every cell of the matrix, family by family (each family built and run as a baseline once)."""
    fam = families_module()
    cells = []
    for name in families or fam.NAMES:
        fr = prepare(name, steps)
        for feature in features:
            cell = run_cell(fr, feature, steps)
            cells.append(cell)
            if progress is not None:
                progress(cell)
    return cells


def totals(cells: list[Cell]) -> dict[str, dict[str, int]]:
    """Per feature: how many cells work / are unsupported / wrong / crash."""
    out: dict[str, dict[str, int]] = {}
    for c in cells:
        out.setdefault(c.feature, {WORKS: 0, UNSUPPORTED: 0, WRONG: 0, CRASH: 0})[c.status] += 1
    return out


def _compact(c: Cell) -> str:
    return {WORKS: "✓", UNSUPPORTED: "unsupported"}.get(c.status, "✗ " + c.status)


def markdown(cells: list[Cell], compact: bool = False) -> str:
    """The matrix as a markdown table (family x feature) followed by per-feature totals.

    ``compact``: cells say only ✓ / unsupported / ✗ (for the README); otherwise measured work and reasons.
    """
    show = _compact if compact else Cell.short
    feats = list(dict.fromkeys(c.feature for c in cells))
    fams = list(dict.fromkeys(c.family for c in cells))
    by = {(c.family, c.feature): c for c in cells}
    lines = ["| family | " + " | ".join(feats) + " |", "|---" * (len(feats) + 1) + "|"]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(show(by[(f, x)]) if (f, x) in by else "" for x in feats) + " |")
    lines += ["", "| feature | works | unsupported | wrong / no-op | crash |", "|---|---|---|---|---|"]
    for feat, t in totals(cells).items():
        lines.append(f"| {feat} | {t[WORKS]} | {t[UNSUPPORTED]} | {t[WRONG]} | {t[CRASH]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hasten.bench.coverage", description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="family names (default: all)")
    ap.add_argument("--features", default=",".join(FEATURES), help="comma-separated features")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--compact", action="store_true", help="cells say only ✓ / unsupported / ✗")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each cell as it finishes")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the families are built from configs: nothing to download
    torch.set_num_threads(1)
    feats = tuple(f for f in args.features.split(",") if f)
    unknown = [f for f in feats if f not in PROTOCOLS]
    if unknown:
        ap.error(f"unknown feature(s) {unknown}; choose from {list(PROTOCOLS)}")

    def show(c: Cell) -> None:
        if args.verbose:
            print(f"{c.family:16s} {c.feature:18s} {c.seconds:5.1f}s {c.short()}", file=sys.stderr, flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    cells = run_matrix(args.families or None, feats, args.steps, show)
    table = markdown(cells, compact=args.compact)
    header = (f"Coverage matrix: {len({c.family for c in cells})} tiny diffusers families x {len(feats)} features, "
              f"{args.steps} steps, CFG on ({time.process_time() - c0:.0f} s CPU on 1 thread, "
              f"{time.perf_counter() - t0:.0f} s wall). Command: `python -m hasten.bench.coverage`.\n\n")
    print(header + table)
    if args.out:
        Path(args.out).write_text(header + table + "\n")
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
