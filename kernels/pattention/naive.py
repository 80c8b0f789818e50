"""TokenFormer's token-parameter attention by its definition (Wang et al. 2024, arXiv 2410.23168, Sec. 3.3).

A linear map becomes attention from the input tokens to ``n`` learnable parameter tokens::

    A   = X Kᵀ                  # [.., n]       K: key parameter tokens   [n, d_in]
    S   = Θ(A)                  # [.., n]       the normalisation, below
    out = S V                   # [.., d_out]   V: value parameter tokens [n, d_out]

Θ (``norm``), the paper's ablation of the softmax part, as the authors' code defines them
(megatron/model/tokenformer.py, ``nonlinear_norm_func``; there τ is re-derived from the current n):

* ``l2_gelu`` (Eq. 5, the default; released ``l2_norm_gelu``): S = GeLU(τ · A / ‖A‖₂), τ = √n;
* ``softmax`` (released ``softmax`` = exp, then L1 normalisation): S = τ · exp(A) / ‖exp(A)‖₁ = τ · softmax(A),
  τ = n;
* ``l1_gelu``: S = GeLU(τ · A / ‖A‖₁), τ = n. Not in the released code (it has ``softmax``, ``l2_norm_gelu`` and
  ``gelu_l2_norm``); the L1 analogue of Eq. 5, scaled like the released softmax so that |S|'s mean is O(1).

Norms are clamped to at least ``NORM_EPS``: only an all-zero score row is affected (it maps to S = GeLU(0) = 0
instead of 0/0). τ is an argument: ``arch.pattention`` keeps it fixed through growth.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Norm = Literal["l2_gelu", "l1_gelu", "softmax"]
NORMS = ("l2_gelu", "l1_gelu", "softmax")
NORM_EPS = 1e-12


def default_tau(norm: str, n: int) -> float:
    """τ at construction: √n for ``l2_gelu``, n for ``l1_gelu`` and ``softmax``."""
    return math.sqrt(n) if norm == "l2_gelu" else float(n)


def normalise(a: torch.Tensor, tau: torch.Tensor | float, norm: str) -> torch.Tensor:
    """Θ(A) over the last dim (the n scores of a row)."""
    if norm == "l2_gelu":
        return F.gelu(tau * a / a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))
    if norm == "l1_gelu":
        return F.gelu(tau * a / a.abs().sum(-1, keepdim=True).clamp_min(NORM_EPS))
    if norm == "softmax":
        return tau * torch.softmax(a, dim=-1)
    raise ValueError(f"norm: {norm!r} is not one of {', '.join(NORMS)}")


def naive_pattention(
    x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tau: torch.Tensor | float, norm: str = "l2_gelu"
) -> torch.Tensor:
    """x: [..., d_in], key: [n, d_in], value: [n, d_out], tau: scalar -> [..., d_out]."""
    a = x @ key.t()  # [..., n]
    return normalise(a, tau, norm) @ value  # [..., d_out]
