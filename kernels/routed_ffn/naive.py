"""DuoFFN's hard routing by its definition (Duo-LLM, Alizadeh et al. 2024, arXiv 2410.10846, Sec. 3): every
module runs on every token, then each token keeps the output of its route. Compute does not follow the route
here (that is what the other implementations are for); the result is what they must equal.

Routes: ``SKIP = 0`` (the FFN contributes exactly zero), ``SMALL = 1``, ``BIG = 2``. Modules are SwiGLU FFNs
(Shazeer 2020) given by their weights, in ``nn.Linear`` layout: ``swiglu(x) = (silu(x W1ᵀ) ∘ x W3ᵀ) W2ᵀ``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SKIP, SMALL, BIG = 0, 1, 2


class SwiGLUWeights(NamedTuple):
    """One SwiGLU module: w1 (gate) and w3 (up) [d_ff, D], w2 (down) [D, d_ff] (``nn.Linear.weight`` layouts)."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


def swiglu(x: torch.Tensor, w: SwiGLUWeights) -> torch.Tensor:
    """[..., D] -> [..., D]."""
    return F.linear(F.silu(F.linear(x, w.w1)) * F.linear(x, w.w3), w.w2)


def naive_routed_ffn(x: torch.Tensor, route: torch.Tensor, small, big, residual: torch.Tensor | None) -> torch.Tensor:
    """x [..., D], route [...] in {SKIP, SMALL, BIG} -> residual + the routed module's output (zero on SKIP).
    ``small``, ``big``: functions [..., D] -> [..., D] (e.g. ``functools.partial(swiglu, w=weights)``)."""
    r = route[..., None]
    y = torch.where(r == BIG, big(x), torch.where(r == SMALL, small(x), torch.zeros_like(x)))
    return y if residual is None else residual + y
