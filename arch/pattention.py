"""TokenFormer's token-parameter attention (Wang et al. 2024, arXiv 2410.23168, Sec. 3.3, Eq. 3-5).

A linear map becomes attention from the input tokens to ``n`` learnable parameter tokens::

    A   = X Kᵀ                         # [.., n]   K: key parameter tokens   [n, d_in]
    S   = GeLU(τ · A / ‖A‖₂)           # L2 norm over the n scores of each row; τ = √n at construction
    out = S V                          # [.., d_out]  V: value parameter tokens [n, d_out]

The op itself (and the paper's normalisation ablations, ``norm``: ``l2_gelu`` = Eq. 5, ``l1_gelu``, ``softmax``)
is ``kernels.pattention.pattention``; ``impl`` picks its implementation (``auto``: the fused Triton kernels on
CUDA, the definition on CPU).

τ is a buffer fixed at construction and never changed by growth, so that appending parameter tokens with
zero keys leaves every output unchanged (the authors' code re-derives τ = √n_new and draws random keys, which
changes the function; see ../shared/PAPERS.md). ``grow_`` appends tokens in place; under ``softmax`` it refuses
(a zero key still gets weight exp(0) and changes every output).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from kernels.pattention import pattention
from kernels.pattention.api import Impl
from kernels.pattention.naive import Norm, default_tau

from .config import LayerContext
from .registry import FFNS, PROJS, ConfigError

GROWABLE_NORMS = ("l2_gelu", "l1_gelu")  # zero new keys keep A, the row norm and S of the old tokens


class Pattention(nn.Module):
    """Attention over ``n_tokens`` key/value parameter tokens (TokenFormer Eq. 5, "l2_norm_gelu", by default).

    Init as the reference code: keys N(0, key_std); values N(0, value_std) with the "wang_init"
    std = 2 / (n_layers · √d_model) supplied by the caller. ``norm``: Θ (see ``kernels.pattention.naive``);
    τ = √n (``l2_gelu``) or n (``l1_gelu``, ``softmax``) at construction. ``impl``: the op's implementation.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_tokens: int,
        value_std: float,
        key_std: float = 0.02,
        norm: Norm = "l2_gelu",
        impl: Impl = "auto",
    ):
        super().__init__()
        self.key = nn.Parameter(torch.randn(n_tokens, d_in) * key_std)  # [n, d_in]
        self.value = nn.Parameter(torch.randn(n_tokens, d_out) * value_std)  # [n, d_out]
        self.value_std, self.norm, self.impl = value_std, norm, impl
        self.register_buffer("tau", torch.tensor(default_tau(norm, n_tokens)))  # fixed: growth keeps it
        self.register_buffer("n_old", torch.tensor(n_tokens))  # token count before the latest growth

    @property
    def n_tokens(self) -> int:
        return self.key.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key, self.value, self.tau, norm=self.norm, impl=self.impl)

    @torch.no_grad()
    def grow_(self, n_new: int, generator: Optional[torch.Generator] = None) -> None:
        """Append ``n_new - n`` tokens: zero keys (so A, ‖A‖ and S of the old tokens are unchanged and the new
        scores are GeLU(0) = 0) and random values (std ``value_std``), so the new tokens can learn."""
        n = self.n_tokens
        if self.norm not in GROWABLE_NORMS:
            raise ConfigError(
                f"cannot grow a Pattention with norm {self.norm!r}: zero new keys preserve the function only under "
                f"{', '.join(GROWABLE_NORMS)} (under softmax a new token gets weight exp(0) and changes every output)"
            )
        if n_new < n:
            raise ValueError(f"cannot shrink a Pattention from {n} to {n_new} tokens")
        key = self.key.new_zeros(n_new - n, self.key.shape[1])
        value = torch.randn(n_new - n, self.value.shape[1], generator=generator, dtype=self.value.dtype)
        self.key = nn.Parameter(torch.cat([self.key, key]))
        self.value = nn.Parameter(torch.cat([self.value, value.to(self.value.device) * self.value_std]))
        self.n_old.fill_(n)

    def extra_repr(self) -> str:
        return f"d_in={self.key.shape[1]}, d_out={self.value.shape[1]}, n_tokens={self.n_tokens}, norm={self.norm}"


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
        norm: Norm = "l2_gelu",
        impl: Impl = "auto",
    ):
        n = {"qkv": qkv_tokens, "proj": proj_tokens}[role] or ctx.d_model
        super().__init__(d_in, d_out, n, value_std=wang_std(ctx), key_std=ctx.init_std, norm=norm, impl=impl)
        self.role = role


@FFNS.register("pattention")
class PattentionFFN(Pattention):
    """``ffn: {type: pattention}``: the whole FFN is one Pattention, no extra activation (default 4·d_model tokens)."""

    def __init__(
        self, ctx: LayerContext, *, n_tokens: Optional[int] = None, norm: Norm = "l2_gelu", impl: Impl = "auto"
    ):
        n = n_tokens or 4 * ctx.d_model
        super().__init__(
            ctx.d_model, ctx.d_model, n, value_std=wang_std(ctx), key_std=ctx.init_std, norm=norm, impl=impl
        )
        self.role = "ffn"
