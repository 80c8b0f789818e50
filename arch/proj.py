"""Projections: the ``proj:`` key of a model picks the class every mixer uses for its Q/K/V/output maps."""

from __future__ import annotations

from torch import nn

from .config import LayerContext
from .registry import PROJS


@PROJS.register("linear")
class Linear(nn.Linear):
    """A bias-free linear map, GPT-2 init: N(0, init_std), residual-writing roles scaled by 1/sqrt(2L)."""

    def __init__(self, ctx: LayerContext, d_in: int, d_out: int, role: str, *, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        std = ctx.residual_std() if role in ("proj", "ffn_out") else ctx.init_std
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
