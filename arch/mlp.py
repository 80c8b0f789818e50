"""Feed-forward blocks: SwiGLU (Shazeer 2020) and GELU MLPs."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerContext
from .proj import Linear
from .registry import FFNS


def default_d_ff(d_model: int, activation: str, multiple_of: int = 32) -> int:
    """4d for GELU; for SwiGLU 2/3 of 4d (same parameter count as a 4d GELU MLP), rounded up."""
    if activation == "gelu":
        return 4 * d_model
    d_ff = int(2 * 4 * d_model / 3)
    return multiple_of * -(-d_ff // multiple_of)


@FFNS.register("mlp")
class MLP(nn.Module):
    """swiglu: W2 (silu(W1 x) * W3 x);  gelu: W2 gelu(W1 x)."""

    def __init__(
        self,
        ctx: LayerContext,
        *,
        activation: Literal["swiglu", "gelu"] = "swiglu",
        d_ff: Optional[int] = None,
        bias: bool = False,
    ):
        super().__init__()
        self.activation = activation
        d, d_ff = ctx.d_model, d_ff or default_d_ff(ctx.d_model, activation)
        self.w1 = Linear(ctx, d, d_ff, "ffn_in", bias=bias)
        self.w3 = Linear(ctx, d, d_ff, "ffn_in", bias=bias) if activation == "swiglu" else None
        self.w2 = Linear(ctx, d_ff, d, "ffn_out", bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))
