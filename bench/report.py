"""Bench output: a terminal table, a JSON file and the speed-up vs. PSNR (Pareto) plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import BenchRow

COLUMNS = [
    ("variant", "name", "{}"),
    ("median s", "median_s", "{:.3f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("fwd/img", "forwards_per_image", "{:.1f}"),
    ("work", "work", "{:.2f}x"),
    ("weights", "weight_ratio", "{:.2f}x"),
    ("PSNR dB", "psnr", "{:.2f}"),
    ("worst dB", "psnr_worst", "{:.2f}"),
    ("SSIM", "ssim", "{:.4f}"),
    ("digit acc", "accuracy", "{:.0%}"),
    ("motion acc", "motion_accuracy", "{:.0%}"),
    ("Fréchet", "frechet", "{:.2f}"),
    ("keys kept", "key_blocks_kept", "{:.0%}"),
]
# shown only when some row has a value (video metrics, sparse attention's kept key blocks, the worst item's PSNR)
OPTIONAL = {"motion_accuracy", "key_blocks_kept", "psnr_worst"}


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def table(rows: Sequence[BenchRow]) -> str:
    """The side-by-side table (unavailable or failed variants listed with their reason)."""
    cols = [c for c in COLUMNS
            if c[1] not in OPTIONAL or any(getattr(r, c[1]) is not None for r in rows if not r.error)]
    cells = [[h for h, _, _ in cols]]
    notes = []
    for r in rows:
        if r.error:
            notes.append(f"  {r.name}: not measured — {r.error}")
            continue
        cells.append([_cell(getattr(r, attr), fmt) for _, attr, fmt in cols])
    widths = [max(len(c[j]) for c in cells) for j in range(len(cols))]
    lines = ["  ".join(c[j].ljust(widths[j]) if j == 0 else c[j].rjust(widths[j]) for j in range(len(c)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + (["", "Not measured:"] + notes if notes else []))


def write_json(rows: Sequence[BenchRow], path: Path, meta: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps({"meta": clean(meta), "rows": [clean(r.to_dict()) for r in rows]}, indent=2))


def pareto_figure(rows: Sequence[BenchRow], title: str = "speed-up vs. PSNR"):
    """A matplotlib figure: one marker per variant, one line per family (hasten, diffusers, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    fams: dict[str, list[BenchRow]] = {}
    for r in rows:
        if r.error or r.speedup is None or r.family == "baseline":
            continue
        fams.setdefault(r.name.split("@")[0], []).append(r)
    cap = 60.0
    colors = plt.get_cmap("tab20").colors
    for i, (name, rs) in enumerate(fams.items()):
        rs = sorted(rs, key=lambda r: r.speedup or 0)
        ys = [min(r.psnr, cap) if r.psnr is not None else cap for r in rs]
        # hasten solid, peers dashed, the ComfyUI engine dotted: one distinct colour per curve
        style = ":" if name.startswith("comfyui") else ("-" if name.startswith("hasten") else "--")
        ax.plot([r.speedup for r in rs], ys, marker="os^Dv"[i % 5], ls=style, color=colors[i % len(colors)],
                lw=2 if style == "-" else 1.2, label=name)
        for r, y in zip(rs, ys):
            ax.annotate(r.name.split("@")[-1], (r.speedup, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([r for rs in fams.values() for r in rs if r.name.startswith("hasten")])
    if len(front) > 1:
        ax.step([r.speedup for r in front], [min(r.psnr, cap) for r in front], where="post", color="black",
                lw=0.8, alpha=0.5, label="hasten's best (any variant)")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall-clock speed-up vs. baseline (median, same process)")
    ax.set_ylabel(f"PSNR vs. same-seed baseline (dB, capped at {cap:g})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def pareto_front(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """The rows no other row beats on both speed-up and PSNR, fastest first (PSNR falling)."""
    pts = sorted((r for r in rows if r.speedup is not None and r.psnr is not None), key=lambda r: -(r.speedup or 0))
    front: list[BenchRow] = []
    for r in pts:
        if not front or (r.psnr or 0) > (front[-1].psnr or 0):
            front.append(r)
    return front


def write_plot(rows: Sequence[BenchRow], path: Path, title: str = "speed-up vs. PSNR") -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
