"""Forecasting reuse (TaylorSeer/FoCa-style), shared by every cache that reuses a stored quantity.

When a cache skips work it normally reuses the last computed value (EasyCache's Δ = out − x, a block
span's residual) as a constant. With a forecast it instead extrapolates that value in step index from
the last 2 (``"linear"``) or 3 (``"quadratic"``) computed ones, through the Lagrange polynomial
P(t) = Σ_i y_i Π_{j≠i} (t − t_j)/(t_i − t_j). SADA's extrapolation of the solver gradient uses the same
polynomial. One implementation here, so every cache forecasts identically.
"""

from __future__ import annotations

from typing import TypeVar

import torch

FORECASTS = ("none", "linear", "quadratic")
ORDER = {"none": 0, "linear": 1, "quadratic": 2}

Point = tuple[int, torch.Tensor]  # (step index, value)
V = TypeVar("V")


def lagrange_extrapolate(points: list[tuple[float, torch.Tensor]], t: float) -> torch.Tensor:
    """Value at ``t`` of the polynomial through ``points`` ((position, tensor) pairs, distinct positions),
    computed in float32: P(t) = Σ_i y_i Π_{j≠i} (t − t_j)/(t_i − t_j)."""
    out = torch.zeros_like(points[0][1], dtype=torch.float32)
    for i, (ti, yi) in enumerate(points):
        w = 1.0
        for j, (tj, _) in enumerate(points):
            if j != i:
                w *= (t - tj) / (ti - tj)
        out += w * yi.float()
    return out


def push(past: list[tuple[int, V]], step: int, value: V, order: int) -> list[tuple[int, V]]:
    """``past`` with ``(step, value)`` appended, keeping the ``order + 1`` newest points.

    The step index going back (a new pass) restarts the history; a second value at the same step (a
    2nd-order sampler's second call) replaces the first, so positions stay distinct.
    """
    if past and past[-1][0] > step:
        past = []
    if past and past[-1][0] == step:
        past = past[:-1]
    return [*past[-order:], (step, value)] if order > 0 else [(step, value)]


def forecast(past: list[Point], step: int, order: int) -> torch.Tensor | None:
    """The value at ``step`` extrapolated (float32) with up to ``order`` from ``past``; None when fewer than two
    points are known or ``order`` is 0 (the caller then reuses its last value as a constant)."""
    order = min(order, len(past) - 1)
    if order <= 0:
        return None
    return lagrange_extrapolate([(float(s), v) for s, v in past[-order - 1:]], float(step))
