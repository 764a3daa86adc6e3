"""SADA's token-level sparsity (Jiang et al., ICML 2025, second half), framework-neutral: tensors in, decisions out.

When SADA's step-level test says a step must be computed, the trajectory is read *per token*: from the last
computed outputs of a branch (denoiser output space, ``(1, C, F, H, W)``), each token's rate of change
``|d₁| = |f₂ − f₁| / (s₂ − s₁)`` is averaged over channels and over the token's latent patch. The fastest-moving
tokens are computed and the most stable ones pruned. (Ranking by the paper's per-token sign test
``−(d₁ − d₀) > 0``, or by the curvature ``|d₁ − d₀|``, measured 4-10 dB worse on the embedded model at the same
token budget: the sign says *whether* a token is stable, not how much reusing it costs.) As in the paper's
strided destination tokens, one token per ``stride × stride`` cell of every frame is always kept, so no region
of the image starves.

Inside the network only the kept tokens are queries and MLP rows (the adapter gathers them before the first
block and scatters them back after the last); their self-attention still sees every token, with the pruned
tokens' keys/values taken from the branch's last forward. A pruned token's output comes from the cache: its
last computed denoiser output (``order`` 0), or extrapolated from its trajectory with the solver's gradient
information (``order`` 1, Adams–Bashforth-like). Order 0 measured better (37.1 vs 27.9 dB token-only at half
the tokens on the embedded model): a pruned token is a slow one, and a linear step from an estimate
compounds. The paper keeps each block's last feature map for pruned tokens instead; hasten never needs
per-block features because the kept tokens attend to cached keys/values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def token_grid(latent_shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, rows, cols) of transformer tokens for a latent ``(…, F, H, W)`` cut into ``patch`` = (pt, ph, pw)."""
    f, h, w = (latent_shape[-3], latent_shape[-2], latent_shape[-1]) if len(latent_shape) >= 5 else \
        (1, latent_shape[-2], latent_shape[-1])
    pt, ph, pw = patch
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent {tuple(latent_shape)} is not a whole number of {patch} patches")
    return f // pt, h // ph, w // pw


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 5 else t.unsqueeze(-3)  # (B, C, H, W) images: one frame


def token_scores(past: list[tuple[int, torch.Tensor]], patch: tuple[int, int, int]) -> torch.Tensor | None:
    """Per-token rate of change from the last two computed outputs (None with fewer): the channel- and
    patch-mean of ``|f₂ − f₁| / (s₂ − s₁)``, flattened in token order (frame, row, col). Larger = less safe
    to reuse."""
    if len(past) < 2:
        return None
    (s1, f1), (s2, f2) = past[-2:]
    d1 = ((_as_5d(f2) - _as_5d(f1)) / float(s2 - s1)).abs().float().mean(dim=1, keepdim=True)  # (1, 1, F, H, W)
    return F.avg_pool3d(d1, kernel_size=patch, stride=patch).flatten()


def spread_tokens(grid: tuple[int, int, int], stride: int) -> torch.Tensor:
    """One token per ``stride × stride`` cell of every frame (the cell's centre-most token), in token order."""
    gf, gh, gw = grid
    off = (stride - 1) // 2
    rows = torch.arange(min(off, gh - 1), gh, stride)
    cols = torch.arange(min(off, gw - 1), gw, stride)
    frames = torch.arange(gf)
    idx = (frames[:, None, None] * gh + rows[None, :, None]) * gw + cols[None, None, :]
    return idx.flatten()


def num_kept(num_tokens: int, fraction: float) -> int:
    """How many tokens a token-level step computes (at least one)."""
    return max(1, min(num_tokens, math.ceil(fraction * num_tokens)))


def choose_tokens(scores: torch.Tensor, grid: tuple[int, int, int], fraction: float, stride: int) -> torch.Tensor:
    """The kept token indices (sorted): the spread subset, then the highest-scoring tokens up to the budget
    ``ceil(fraction · N)``. Every call with the same grid and fraction keeps the same count."""
    n = scores.numel()
    k = num_kept(n, fraction)
    spread = spread_tokens(grid, stride).to(scores.device)[:k]
    rank = scores.detach().float().clone()
    rank[spread] = math.inf  # always kept
    kept = torch.topk(rank, k, largest=True, sorted=False).indices
    return kept.sort().values


def latent_mask(kept: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
                like: torch.Tensor) -> torch.Tensor:
    """Boolean mask shaped like ``like``'s one row (``(1, 1, F, H, W)`` or ``(1, 1, H, W)``): True where the latent
    position belongs to a kept token."""
    gf, gh, gw = grid
    m = torch.zeros(gf * gh * gw, dtype=torch.bool, device=like.device)
    m[kept.to(like.device)] = True
    m = m.view(gf, gh, gw)
    pt, ph, pw = patch
    m = m.repeat_interleave(pt, 0).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    return m.view(1, 1, *m.shape) if like.ndim == 5 else m.view(1, 1, *m.shape[1:])


def fill_pruned(out: torch.Tensor, estimate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out`` at kept positions, the trajectory ``estimate`` at pruned ones."""
    return torch.where(mask, out, estimate.to(out.dtype))


def take_tokens(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``idx`` (``(B, k)``: per batch row) of the token dimension ``dim`` of ``t`` (batch 1 or B)."""
    t = t.movedim(dim, 1)
    out = t[0][idx] if t.shape[0] == 1 else t[torch.arange(idx.shape[0], device=t.device)[:, None], idx]
    return out.movedim(1, dim)


def put_tokens(full: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``full`` (``(B, N, …)``) with the kept tokens ``idx`` (``(B, k)``) set to ``values`` (``(B, k, …)``):
    the scatter after the last block."""
    out = full.clone()
    out[torch.arange(idx.shape[0], device=full.device)[:, None], idx] = values.to(full.dtype)
    return out


@dataclass
class TokenCall:
    """A token-level forward in flight: kept token indices per row, block 0's full input (scattered into after
    the last block), and side inputs already sliced to the kept tokens (keyed by the source tensor's id)."""

    idx: torch.Tensor  # (B, k)
    full: torch.Tensor | None = None
    memo: dict[int, object] = field(default_factory=dict)


class TokenKV:
    """Each branch's self-attention keys/values per block, so a token-level forward's kept queries still attend
    to every token: a full forward remembers them, a token-level one writes its kept tokens' fresh rows in."""

    def __init__(self) -> None:
        self.kv: dict[object, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # branch -> block -> (K, V)

    def clear(self) -> None:
        self.kv = {}

    def ready(self, keys: list, num_blocks: int, num_tokens: int) -> bool:
        """Every branch holds every block's keys/values for this token count."""
        return all(len(self.kv.get(k, {})) == num_blocks and self.kv[k][0][0].shape[1] == num_tokens for k in keys)

    def complete(self, keys: list, block: int, idx: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
                 dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of ``block`` for the rows ``keys`` (token dimension ``dim``): with ``idx`` None (a full
        forward) remembered and returned as given; else the kept tokens ``idx`` (``(B, k)``) put into the
        remembered full sequence, which is returned."""
        if idx is None:
            for j, key in enumerate(keys):
                self.kv.setdefault(key, {})[block] = (k[j : j + 1].movedim(dim, 1).detach(),
                                                      v[j : j + 1].movedim(dim, 1).detach())
            return k, v
        kf = torch.cat([self.kv[key][block][0] for key in keys])
        vf = torch.cat([self.kv[key][block][1] for key in keys])
        at = (torch.arange(idx.shape[0], device=k.device)[:, None], idx)
        kf[at], vf[at] = k.movedim(dim, 1).to(kf.dtype), v.movedim(dim, 1).to(vf.dtype)  # cat made copies
        for j, key in enumerate(keys):
            self.kv[key][block] = (kf[j : j + 1], vf[j : j + 1])
        return kf.movedim(1, dim), vf.movedim(1, dim)
