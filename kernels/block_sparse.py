"""Block-sparse attention with a compact index layout, so skipped key blocks cost nothing.

A :class:`BlockSparsePattern` lists, per (batch, head, query block), how many key blocks to visit
(``kv_num_blocks[b, h, qb]``) and which (``kv_indices[b, h, qb, :kv_num_blocks]``), as FlexAttention's
block masks do. The Triton kernel loops over the listed blocks only; the PyTorch reference gathers the
listed key/value blocks (never a dense token mask). The last block may be ragged (tokens past the
sequence end are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flash_attention import _scale, key_valid, pick_backend, triton_module


@dataclass
class BlockSparsePattern:
    """Which key blocks each query block attends to; blocks are ``block_size`` tokens (last one ragged)."""

    kv_num_blocks: torch.Tensor  # int32 (B, H, QB)
    kv_indices: torch.Tensor  # int32 (B, H, QB, KB); entries past kv_num_blocks are ignored
    block_size: int
    seq_q: int
    seq_k: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        qb, kb = -(-self.seq_q // self.block_size), -(-self.seq_k // self.block_size)
        if self.kv_num_blocks.ndim != 3 or self.kv_num_blocks.shape[2] != qb:
            raise ValueError(f"kv_num_blocks must be (B, H, {qb}); got {tuple(self.kv_num_blocks.shape)}")
        if self.kv_indices.shape[:3] != self.kv_num_blocks.shape or self.kv_indices.shape[3] > kb:
            raise ValueError(f"kv_indices must be (B, H, {qb}, <= {kb}); got {tuple(self.kv_indices.shape)}")

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_size: int, seq_q: int, seq_k: int) -> BlockSparsePattern:
        """Compact layout from a boolean (B, H, QB, KB) block mask (kept blocks listed in ascending order)."""
        m = mask.bool()
        num = m.sum(-1).to(torch.int32)
        kb = m.shape[-1]
        # kept blocks first (ascending), then the rest: a stable sort on "not kept"
        order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        width = max(int(num.max().item()) if num.numel() else 1, 1)
        return cls(num, order[..., : min(width, kb)].contiguous(), block_size, seq_q, seq_k)

    @classmethod
    def dense(cls, batch: int, heads: int, seq_q: int, seq_k: int, block_size: int,
              device: torch.device | str = "cpu") -> BlockSparsePattern:
        qb, kb = -(-seq_q // block_size), -(-seq_k // block_size)
        return cls.from_block_mask(torch.ones(batch, heads, qb, kb, dtype=torch.bool, device=device),
                                   block_size, seq_q, seq_k)

    @property
    def num_key_blocks(self) -> int:
        return -(-self.seq_k // self.block_size)

    def block_mask(self) -> torch.Tensor:
        """Boolean (B, H, QB, KB) mask of visited blocks."""
        B, H, QB, W = self.kv_indices.shape
        valid = torch.arange(W, device=self.kv_indices.device) < self.kv_num_blocks.unsqueeze(-1).long()
        mask = torch.zeros(B, H, QB, self.num_key_blocks, dtype=torch.bool, device=self.kv_indices.device)
        mask.scatter_(-1, self.kv_indices.long().clamp(max=self.num_key_blocks - 1), valid)
        return mask

    def token_mask(self) -> torch.Tensor:
        """Boolean (B, H, S_q, S_k) token mask equivalent to the pattern (for tests and SDPA comparison)."""
        bs = self.block_size
        m = self.block_mask().repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
        return m[:, :, : self.seq_q, : self.seq_k]

    def density(self) -> float:
        """Visited share of all (query block, key block) pairs."""
        total = self.kv_num_blocks.numel() * self.num_key_blocks
        return float(self.kv_num_blocks.sum().item()) / max(total, 1)

    def select(self, rows: torch.Tensor | list[int]) -> BlockSparsePattern:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.kv_num_blocks.device)
        return BlockSparsePattern(self.kv_num_blocks[idx], self.kv_indices[idx], self.block_size,
                                  self.seq_q, self.seq_k)


def block_sparse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
    scale: float | None = None, max_elems: int = 1 << 25, kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch block-sparse attention ``(out, lse)``: gathers only the listed key/value blocks per query block.

    ``kv_lens`` (B,) optionally marks trailing keys of each batch row as padding; ``kv_mask`` (B, S_k)
    bool marks any padding keys (False).
    """
    s = _scale(q, scale)
    B, H, Sq, D = q.shape
    Sk, bs = k.shape[2], pattern.block_size
    QB, KB, W = -(-Sq // bs), -(-Sk // bs), pattern.kv_indices.shape[-1]
    pad_k = KB * bs - Sk
    kb_ = torch.nn.functional.pad(k.float(), (0, 0, 0, pad_k)).view(B, H, KB, bs, D)
    vb_ = torch.nn.functional.pad(v.float(), (0, 0, 0, pad_k)).view(B, H, KB, bs, D)
    qb_ = torch.nn.functional.pad(q.float(), (0, 0, 0, QB * bs - Sq)).view(B, H, QB, bs, D)
    valid = key_valid(kv_lens, kv_mask, Sk, q.device)
    tok_ok = torch.nn.functional.pad(valid.view(B, 1, Sk), (0, pad_k)) if valid is not None else \
        (torch.arange(KB * bs, device=q.device) < Sk).view(1, 1, KB * bs)
    tok_ok = tok_ok.view(-1, KB, bs)  # (B or 1, KB, bs)
    idx = pattern.kv_indices.long().to(q.device)
    slot_ok = torch.arange(W, device=q.device) < pattern.kv_num_blocks.long().to(q.device).unsqueeze(-1)
    step = max(1, max_elems // max(1, B * H * W * bs * D))
    outs, lses = [], []
    for c in range(0, QB, step):
        ids = idx[:, :, c : c + step]  # (B, H, c, W)
        n = ids.shape[2]
        flat = ids.reshape(B, H, n * W)
        kg = torch.gather(kb_, 2, flat[..., None, None].expand(B, H, n * W, bs, D)).view(B, H, n, W * bs, D)
        vg = torch.gather(vb_, 2, flat[..., None, None].expand(B, H, n * W, bs, D)).view(B, H, n, W * bs, D)
        rows = torch.arange(tok_ok.shape[0], device=q.device).view(-1, 1, 1, 1)
        ok = (tok_ok[rows, ids] & slot_ok[:, :, c : c + step, :, None]).view(B, H, n, 1, W * bs)
        logits = torch.matmul(qb_[:, :, c : c + step], kg.transpose(-1, -2)) * s  # (B, H, n, bs, W*bs)
        logits = logits.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0), vg))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(B, H, QB * bs, D)[:, :, :Sq]
    lse = torch.cat(lses, dim=2).reshape(B, H, QB * bs)[:, :, :Sq]
    return out.to(q.dtype), lse


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
    scale: float | None = None, backend: str = "auto", kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention ``(out, lse)`` on (B, H, S, D); Triton on CUDA when available, else PyTorch.

    ``kv_lens`` / ``kv_mask`` mark padding keys as in :func:`hasten.kernels.flash_attention.flash_attention`.
    """
    if (q.shape[2], k.shape[2]) != (pattern.seq_q, pattern.seq_k):
        raise ValueError(f"pattern is for {pattern.seq_q}x{pattern.seq_k} tokens, got {q.shape[2]}x{k.shape[2]}")
    if pick_backend(q, backend) == "triton":
        mod = triton_module()
        assert mod is not None
        bs = pattern.block_size
        valid = key_valid(kv_lens, kv_mask, k.shape[2], q.device)
        return mod.attention_fwd(q, k, v, _scale(q, scale), pattern.kv_num_blocks.to(q.device),
                                 pattern.kv_indices.to(q.device), kv_mask=valid, block_m=bs, block_n=bs)
    return block_sparse_reference(q, k, v, pattern, scale, kv_lens=kv_lens, kv_mask=kv_mask)
