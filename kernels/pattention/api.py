"""The public entry ``pattention``: checks its arguments, then runs the chosen implementation."""

from __future__ import annotations

from typing import Literal

import torch

from ..common import resolve_impl
from .naive import NORMS, Norm, naive_pattention

Impl = Literal["auto", "naive", "triton"]
IMPLS = ("auto", "naive", "triton")
TRITON_NORMS = ("l2_gelu", "l1_gelu")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pattention(
    x: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tau: torch.Tensor | float,
    *,
    norm: Norm = "l2_gelu",
    impl: Impl = "auto",
) -> torch.Tensor:
    """Token-parameter attention (TokenFormer Eq. 5): Θ(x Kᵀ) V over ``n`` parameter tokens.

    Args:
        x: [..., d_in] input tokens (floating point).
        key: [n, d_in] key parameter tokens; value: [n, d_out] value parameter tokens. The Triton kernels
            compute in x's dtype (key and value are cast to it).
        tau: the scale τ, a Python number or a 0-dim tensor (it may require grad).
        norm: Θ, see ``naive.py``: ``"l2_gelu"`` (Eq. 5), ``"l1_gelu"``, ``"softmax"``.
        impl: ``"naive"`` (the definition: the [..., n] scores in memory), ``"triton"`` (fused kernels; norms
            ``l2_gelu`` and ``l1_gelu``; on CPU tensors only in the Triton interpreter), ``"auto"`` (Triton on
            CUDA tensors when it applies, else ``"naive"``).

    Returns:
        [..., d_out] in x's dtype.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit together, an unknown norm, or impl="triton" with
            a norm or dtype the kernels do not take.
    """
    if norm not in NORMS:
        raise ValueError(f"pattention: norm={norm!r} is not one of {', '.join(NORMS)}")
    if x.dim() < 1 or key.dim() != 2 or value.dim() != 2:
        raise ValueError(
            f"pattention: expected x [..., d_in], key [n, d_in], value [n, d_out]; got "
            f"{list(x.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    if key.shape[1] != x.shape[-1] or value.shape[0] != key.shape[0] or key.shape[0] < 1:
        raise ValueError(
            f"pattention: key must be [n >= 1, {x.shape[-1]}] and value [n, d_out] with the same n; "
            f"got key {list(key.shape)}, value {list(value.shape)}"
        )
    if not (x.is_floating_point() and key.is_floating_point() and value.is_floating_point()):
        raise ValueError(f"pattention: x, key, value must be floating point, got {x.dtype}, {key.dtype}, {value.dtype}")
    if not (x.device == key.device == value.device):
        raise ValueError(
            f"pattention: x, key, value on one device expected, got {x.device}, {key.device}, {value.device}"
        )
    if isinstance(tau, torch.Tensor) and tau.numel() != 1:
        raise ValueError(f"pattention: tau must be a scalar, got shape {list(tau.shape)}")
    reason = None
    if norm not in TRITON_NORMS:
        reason = f"implements norms {', '.join(TRITON_NORMS)}, not {norm!r}"
    elif x.dtype not in TRITON_DTYPES:
        reason = f"does not take {x.dtype} (float32, float16, bfloat16 only)"
    impl = resolve_impl("pattention", impl, IMPLS, x.device, "naive", reason)
    if impl == "naive":
        return naive_pattention(x, key, value, tau, norm)
    from .triton import triton_pattention

    return triton_pattention(x, key, value, tau, norm)
