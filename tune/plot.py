"""The Pareto plot of a tune run: speed-up vs. PSNR of every trial, the front and the chosen stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (speed-up, quality), sorted by speed-up."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def write_plot(result: Any, path: str | Path, title: str = "hasten tune") -> Path:
    """Write a PNG of every trial (CPU-time speed-up on the calibration set vs. PSNR, capped at 60 dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(t.speedup, min(t.psnr, 60.0), t.feasible) for t in result.trials
           if t.error is None and t.speedup is not None and t.psnr is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for feasible, color, label in ((False, "#bbbbbb", "trial"), (True, "#1f77b4", "trial meeting the objective")):
        xs = [p[0] for p in pts if p[2] == feasible]
        ys = [p[1] for p in pts if p[2] == feasible]
        if xs:
            ax.scatter(xs, ys, s=18, c=color, label=label)
    front = pareto_front([(x, y) for x, y, _ in pts])
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", c="#ff7f0e", lw=1, label="Pareto front")
    floor = result.preset.get("objective", {}).get("min_psnr")
    if floor is not None:
        ax.axhline(floor, ls="--", c="#d62728", lw=1, label=f"floor {floor:g} dB")
    b = result.best
    if b is not None and b.speedup is not None and b.psnr is not None:
        ax.scatter([b.speedup], [min(b.psnr, 60.0)], marker="*", s=160, c="#2ca02c", label="chosen", zorder=5)
    ax.set_xlabel("speed-up vs. baseline (CPU time, calibration set)")
    ax.set_ylabel("PSNR vs. baseline (dB, capped at 60)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p
