"""TokenFormer's token-parameter attention (Wang et al. 2024, arXiv 2410.23168, Sec. 3.3, Eq. 3-5).

A linear map becomes attention from the input tokens to ``n`` learnable parameter tokens::

    A   = X Kᵀ                         # [.., n]   K: key parameter tokens   [n, d_in]
    S   = GeLU(τ · A / ‖A‖₂)           # L2 norm over the n scores of each row; τ = √n at construction
    out = S V                          # [.., d_out]  V: value parameter tokens [n, d_out]

τ is a buffer fixed at construction and never changed by growth, so that appending parameter tokens with
zero keys leaves every output unchanged (the authors' code re-derives τ = √n_new and draws random keys, which
changes the function; see ../shared/PAPERS.md). ``grow_`` appends tokens in place.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerContext
from .registry import FFNS, PROJS

# ‖A‖₂ is clamped to at least NORM_EPS: only an all-zero score row (‖A‖ = 0, e.g. a zero input) is affected,
# and it maps to S = GeLU(0) = 0 instead of 0/0 = NaN. Any row with ‖A‖ >= 1e-12 is computed exactly.
NORM_EPS = 1e-12


def pattention(x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x: [..., d_in], key: [n, d_in], value: [n, d_out], tau: scalar -> [..., d_out]."""
    a = x @ key.t()  # [..., n]
    s = F.gelu(tau * a / a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))  # [..., n]
    return s @ value  # [..., d_out]


class Pattention(nn.Module):
    """Attention over ``n_tokens`` key/value parameter tokens (TokenFormer Eq. 5, "l2_norm_gelu").

    Init as the reference code: keys N(0, key_std); values N(0, value_std) with the "wang_init"
    std = 2 / (n_layers · √d_model) supplied by the caller.
    """

    def __init__(self, d_in: int, d_out: int, n_tokens: int, value_std: float, key_std: float = 0.02):
        super().__init__()
        self.key = nn.Parameter(torch.randn(n_tokens, d_in) * key_std)  # [n, d_in]
        self.value = nn.Parameter(torch.randn(n_tokens, d_out) * value_std)  # [n, d_out]
        self.value_std = value_std
        self.register_buffer("tau", torch.tensor(math.sqrt(n_tokens)))  # fixed: growth keeps it
        self.register_buffer("n_old", torch.tensor(n_tokens))  # token count before the latest growth

    @property
    def n_tokens(self) -> int:
        return self.key.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key, self.value, self.tau)

    @torch.no_grad()
    def grow_(self, n_new: int, generator: Optional[torch.Generator] = None) -> None:
        """Append ``n_new - n`` tokens: zero keys (so A, ‖A‖ and S of the old tokens are unchanged and the new
        scores are GeLU(0) = 0) and random values (std ``value_std``), so the new tokens can learn."""
        n = self.n_tokens
        if n_new < n:
            raise ValueError(f"cannot shrink a Pattention from {n} to {n_new} tokens")
        key = self.key.new_zeros(n_new - n, self.key.shape[1])
        value = torch.randn(n_new - n, self.value.shape[1], generator=generator, dtype=self.value.dtype)
        self.key = nn.Parameter(torch.cat([self.key, key]))
        self.value = nn.Parameter(torch.cat([self.value, value.to(self.value.device) * self.value_std]))
        self.n_old.fill_(n)

    def extra_repr(self) -> str:
        return f"d_in={self.key.shape[1]}, d_out={self.value.shape[1]}, n_tokens={self.n_tokens}"


def wang_std(ctx: LayerContext) -> float:
    """The reference code's value init: std = 2 / (n_layers · √d_model)."""
    return 2.0 / (ctx.n_layers * math.sqrt(ctx.d_model))


@PROJS.register("pattention")
class PattentionProj(Pattention):
    """``proj: pattention``: every Q/K/V/output projection of the attention mixer is a Pattention.
    Slot counts per role; default d_model (the paper's Pile models)."""

    def __init__(
        self,
        ctx: LayerContext,
        d_in: int,
        d_out: int,
        role: str,
        *,
        qkv_tokens: Optional[int] = None,
        proj_tokens: Optional[int] = None,
    ):
        n = {"qkv": qkv_tokens, "proj": proj_tokens}[role] or ctx.d_model
        super().__init__(d_in, d_out, n, value_std=wang_std(ctx), key_std=ctx.init_std)
        self.role = role


@FFNS.register("pattention")
class PattentionFFN(Pattention):
    """``ffn: {type: pattention}``: the whole FFN is one Pattention, no extra activation (default 4·d_model tokens)."""

    def __init__(self, ctx: LayerContext, *, n_tokens: Optional[int] = None):
        super().__init__(
            ctx.d_model, ctx.d_model, n_tokens or 4 * ctx.d_model, value_std=wang_std(ctx), key_std=ctx.init_std
        )
        self.role = "ffn"
