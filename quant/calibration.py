"""Calibration: per-layer input-activation statistics recorded from a few real forward passes.

Forward pre-hooks on every ``nn.Linear`` record, per input channel, the running max and mean of
``|x|`` (AWQ's saliency and SmoothQuant's range) and a uniform reservoir sample of input rows used to
measure each layer's quantization error. The hooks are removed when recording ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LayerStats:
    """Statistics of one linear layer's input over the calibration run."""

    absmax: torch.Tensor  # [in] fp32, max |x| per input channel
    abssum: torch.Tensor  # [in] fp32, sum |x| per input channel
    rows: int  # rows (tokens) seen
    samples: torch.Tensor  # [n, in] fp32 reservoir sample of input rows

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)


class CalibrationData:
    """Per-layer :class:`LayerStats` by module path (relative to the calibrated module)."""

    def __init__(self, layers: dict[str, LayerStats] | None = None, calls: int = 0) -> None:
        self.layers: dict[str, LayerStats] = layers or {}
        self.calls = calls

    def get(self, name: str) -> LayerStats | None:
        return self.layers.get(name)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"CalibrationData({len(self.layers)} layers, {self.calls} forward calls)"

    def save(self, path: str) -> None:
        """Write the statistics to a safetensors file (re-usable without re-running calibration)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        for name, st in self.layers.items():
            tensors[f"{name}::absmax"] = st.absmax.detach().cpu().contiguous()
            tensors[f"{name}::abssum"] = st.abssum.detach().cpu().contiguous()
            tensors[f"{name}::samples"] = st.samples.detach().cpu().contiguous()
            rows[name] = st.rows
        save_file(tensors, path, metadata={"hasten": "calibration", "rows": json.dumps(rows),
                                           "calls": str(self.calls)})

    @classmethod
    def load(cls, path: str) -> CalibrationData:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("hasten") != "calibration":
                raise ValueError(f"{path} is not a hasten calibration file (missing 'hasten: calibration')")
            rows = json.loads(meta["rows"])
            layers = {name: LayerStats(absmax=f.get_tensor(f"{name}::absmax"),
                                       abssum=f.get_tensor(f"{name}::abssum"), rows=int(n),
                                       samples=f.get_tensor(f"{name}::samples"))
                      for name, n in rows.items()}
        return cls(layers, int(meta.get("calls", 0)))


class _Recorder:
    def __init__(self, max_samples: int, seed: int) -> None:
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: dict[str, LayerStats] = {}
        self.filled: dict[str, int] = {}
        self.calls = 0

    def update(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        a = x.abs()
        st = self.stats.get(name)
        if st is None:
            cap = self.max_samples
            st = LayerStats(absmax=a.amax(0), abssum=a.sum(0), rows=0,
                            samples=torch.zeros(cap, x.shape[1], device=x.device))
            self.stats[name] = st
            self.filled[name] = 0
        else:
            st.absmax = torch.maximum(st.absmax, a.amax(0))
            st.abssum = st.abssum + a.sum(0)
        self._reservoir(name, st, x)
        st.rows += n

    def _reservoir(self, name: str, st: LayerStats, x: torch.Tensor) -> None:
        # Uniform reservoir over all rows ever seen; a large call is first thinned to `cap` random rows,
        # each standing for n / k rows of the stream.
        cap, n = self.max_samples, x.shape[0]
        k = min(n, cap)
        pick = torch.randint(n, (k,), generator=self.gen) if k < n else torch.arange(n)
        rows = x[pick.to(x.device)]
        filled = self.filled[name]
        free = min(cap - filled, k)
        if free > 0:
            st.samples[filled:filled + free] = rows[:free]
            self.filled[name] = filled + free
        if free < k:
            rest = torch.arange(free, k)
            pos = st.rows + (rest.float() + 1) * (n / k)  # stream position each kept row stands for
            accept = torch.rand(len(rest), generator=self.gen) < cap / pos
            slots = torch.randint(cap, (len(rest),), generator=self.gen)
            sel = rest[accept]
            if len(sel):
                st.samples[slots[accept].to(x.device)] = rows[sel.to(x.device)]

    def finish(self) -> CalibrationData:
        for name, st in self.stats.items():
            st.samples = st.samples[: self.filled[name]].clone()
        return CalibrationData(self.stats, self.calls)


@contextmanager
def record_activations(module: nn.Module, max_samples: int = 256, seed: int = 0
                       ) -> Iterator[Callable[[], CalibrationData]]:
    """Record input statistics of every ``nn.Linear`` in ``module`` while the block runs.

    Yields a function returning the :class:`CalibrationData` (complete once the block exits)::

        with record_activations(model) as result:
            model(x)
        calib = result()
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    rec = _Recorder(max_samples, seed)
    handles = []
    done: dict[str, CalibrationData] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else (kwargs or {}).get("input")
            if isinstance(x, torch.Tensor):
                rec.update(name, x)

        return hook

    def root_hook(mod: nn.Module, args: tuple) -> None:
        rec.calls += 1

    try:
        handles.append(module.register_forward_pre_hook(root_hook))
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        yield lambda: done["data"] if "data" in done else rec.finish()
    finally:
        for h in handles:
            h.remove()
        done["data"] = rec.finish()


def calibrate(module: nn.Module, run: Callable[[], Any], max_samples: int = 256, seed: int = 0
              ) -> CalibrationData:
    """Run ``run()`` (a few real forward passes / sampling steps) under :func:`record_activations`."""
    with record_activations(module, max_samples=max_samples, seed=seed) as result, torch.no_grad():
        run()
    return result()
