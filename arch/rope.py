"""Rotary position embedding (Su et al. 2021, RoFormer), NeoX "rotate half" layout, optionally on a fraction
of each head's dims (GPT-NeoX / TokenFormer rotate 25%)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        self.rot_dim = int(head_dim * fraction)
        inv_freq = 1.0 / theta ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float32) / max(self.rot_dim, 1))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, rot/2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, rot]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, T, H, hd] at positions offset..offset+T-1 -> same shape, rotated."""
        if self.rot_dim == 0:
            return x
        T = x.shape[1]
        if offset + T > self.cos.shape[0]:
            raise ValueError(f"sequence of {offset + T} positions exceeds max_seq_len={self.cos.shape[0]}")
        cos = self.cos[offset : offset + T, None, :].to(x.dtype)  # [T, 1, rot]
        sin = self.sin[offset : offset + T, None, :].to(x.dtype)
        xr, xp = x[..., : self.rot_dim], x[..., self.rot_dim :]
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([rotated, xp], dim=-1) if xp.shape[-1] else rotated
