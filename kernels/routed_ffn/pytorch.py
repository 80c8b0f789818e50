"""``impl="torch"``: hard routing in PyTorch where compute follows the route.

Tokens are grouped by route with one stable sort, gathered (a permutation whose gradient is the inverse
permutation, ``permute_rows``), each module runs once on its contiguous group, and the results are scattered
back; SKIP tokens get exact zeros and cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Module = Callable[[torch.Tensor], torch.Tensor]


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose gradient is the gather ``grad[inverse]``, not a scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [N, D] in the order ``perm`` (a permutation of N; ``inverse`` its inverse)."""
    return _PermuteRows.apply(x, perm, inverse)


def torch_routed_ffn(
    x: torch.Tensor, route: torch.Tensor, small: Module, big: Module, residual: torch.Tensor | None
) -> torch.Tensor:
    """Arguments as ``kernels.routed_ffn.routed_ffn`` (checked there), the modules as functions [n, D] -> [n, D]."""
    flat_x, flat_r = x.reshape(-1, x.shape[-1]), route.reshape(-1)  # [N, D], [N]
    n_skip, n_small, n_big = torch.bincount(flat_r, minlength=3).tolist()
    if n_skip == len(flat_r):
        y = torch.zeros_like(x)
    elif n_small == len(flat_r) or n_big == len(flat_r):  # every token on one module: no gather/scatter
        y = (small if n_small else big)(x)
    else:
        order = flat_r.argsort(stable=True)  # token indices grouped by route: SKIP, then SMALL, then BIG
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        xs = permute_rows(flat_x, order, inverse)  # [N, D] gathered
        ys = [xs.new_zeros(n_skip, xs.shape[1])]  # SKIP: exactly zero, nothing computed
        ys += [small(xs[n_skip : n_skip + n_small])] if n_small else []
        ys += [big(xs[n_skip + n_small :])] if n_big else []
        y = permute_rows(torch.cat(ys), inverse, order).view_as(x)  # [N, D] scattered back
    return y if residual is None else residual + y
