"""The public entry ``routed_ffn``: checks its arguments, then runs the chosen implementation."""

from __future__ import annotations

import functools
from typing import Literal

import torch

from ..common import resolve_impl
from .naive import SwiGLUWeights, naive_routed_ffn, swiglu
from .pytorch import torch_routed_ffn

Impl = Literal["auto", "naive", "torch", "triton"]
IMPLS = ("auto", "naive", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def routed_ffn(
    x: torch.Tensor,
    route: torch.Tensor,
    small: SwiGLUWeights,
    big: SwiGLUWeights,
    *,
    residual: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """DuoFFN's hard routing: each token through its own route's SwiGLU module only.

    Args:
        x: [..., D] the FFN's input tokens (floating point).
        route: integer [...] (x's leading shape), per token ``0`` = SKIP (the FFN adds exactly zero),
            ``1`` = SMALL, ``2`` = BIG.
        small, big: ``SwiGLUWeights(w1, w3, w2)`` (or any 3-sequence of tensors): w1, w3 [d_ff, D], w2 [D, d_ff]
            (``nn.Linear.weight`` layouts; each module its own d_ff). The Triton kernels compute in x's dtype.
            Or two modules (callables [n, D] -> [n, D], e.g. a pretrained model's own MLP): then only the
            ``naive`` and ``torch`` paths apply (``auto`` = ``torch``).
        residual: optional [..., D] added to the output (fused into the scatter by the Triton kernels).
        impl: ``"naive"`` (the definition: both modules on every token), ``"torch"`` (sort, gather, compute per
            module, scatter), ``"triton"`` (grouped GEMMs per module; on CPU tensors only in the Triton
            interpreter), ``"auto"`` (Triton on CUDA tensors of a Triton dtype, else ``"torch"``).

    Returns:
        [..., D]: ``residual + module_route(x)`` per token (``module_SKIP = 0``), in x's dtype.

    Raises:
        ValueError: shapes, dtypes, devices or route values that do not fit (the message says which).
    """
    if callable(small) or callable(big):  # modules given as functions: grouped PyTorch calls (no Triton)
        small, big = (m if callable(m) else functools.partial(swiglu, w=SwiGLUWeights(*m)) for m in (small, big))
        _check(x, route, None, None, residual)
        if impl == "triton":
            raise ValueError("routed_ffn: impl 'triton' needs the modules as SwiGLUWeights, got callables")
        run = naive_routed_ffn if impl == "naive" else torch_routed_ffn
        return run(x, route, small, big, residual)
    small, big = SwiGLUWeights(*small), SwiGLUWeights(*big)
    _check(x, route, small, big, residual)
    reason = None if x.dtype in TRITON_DTYPES else f"does not take {x.dtype} (float32, float16, bfloat16 only)"
    impl = resolve_impl("routed_ffn", impl, IMPLS, x.device, "torch", reason)
    if impl == "triton":
        from .triton import triton_routed_ffn

        return triton_routed_ffn(x, route, small, big, residual)
    run = naive_routed_ffn if impl == "naive" else torch_routed_ffn
    return run(x, route, functools.partial(swiglu, w=small), functools.partial(swiglu, w=big), residual)


def _check(x, route, small: SwiGLUWeights, big: SwiGLUWeights, residual) -> None:
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"routed_ffn: x must be a floating [..., D] tensor, got {x.dtype} {list(x.shape)}")
    D = x.shape[-1]
    if route.shape != x.shape[:-1] or route.is_floating_point() or route.dtype == torch.bool:
        raise ValueError(
            f"routed_ffn: route must be an integer tensor of shape {list(x.shape[:-1])}, got "
            f"{route.dtype} {list(route.shape)}"
        )
    if route.numel() and route.device.type != "meta" and not bool(((route >= 0) & (route <= 2)).all()):
        raise ValueError("routed_ffn: route values must be 0 (skip), 1 (small) or 2 (big)")
    for name, w in (("small", small), ("big", big)) if small is not None else ():
        F = w.w1.shape[0] if w.w1.dim() == 2 else -1
        if w.w1.shape != (F, D) or w.w3.shape != (F, D) or w.w2.shape != (D, F) or F < 1:
            raise ValueError(
                f"routed_ffn: {name}: expected w1, w3 [d_ff, {D}] and w2 [{D}, d_ff], got "
                f"{list(w.w1.shape)}, {list(w.w3.shape)}, {list(w.w2.shape)}"
            )
        if any(t.device != x.device or not t.is_floating_point() for t in w):
            raise ValueError(f"routed_ffn: {name}: weights must be floating tensors on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(f"routed_ffn: residual must match x ({list(x.shape)}), got {list(residual.shape)}")
    if route.device != x.device:
        raise ValueError(f"routed_ffn: route on {route.device}, x on {x.device}")
