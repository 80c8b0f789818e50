"""Normalisation layers: RMSNorm, LayerNorm, and the non-parametric LayerNorm that TokenFormer uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import NORMS


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D]
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm with gain and bias."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__(dim, eps=eps)


@NORMS.register("layernorm_np")
class NonParametricLayerNorm(nn.Module):
    """LayerNorm without gain or bias (TokenFormer's blocks): y = (x - mean) / sqrt(var + eps)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), eps=self.eps)
