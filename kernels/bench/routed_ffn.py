"""``routed_ffn``: DuoFFN hard routing (big SwiGLU module with ``d_ff``, small with ``d_ff / 16``) at a share
``p_big`` of the tokens on the big module and the rest on the small one, against every token through the big one.

Implementations:

* ``triton``: ``kernels.routed_ffn.routed_ffn(impl="triton")``, grouped GEMMs per module (CUDA);
* ``torch``: ``impl="torch"``, sort / gather / compute per module / scatter in PyTorch;
* ``all-big``: the big SwiGLU on every token (``F.linear`` ×3): what routing must beat (target on GPU at 25%
  big: ≤ 0.35× its time).

FLOPs: 6·D·(n_big·d_ff + n_small·d_ff/16) forward (for ``all-big``: every token big); fwd+bwd 3× forward.
"""

from __future__ import annotations

import torch

from kernels.routed_ffn import SwiGLUWeights, routed_ffn
from kernels.routed_ffn.naive import swiglu

from .registry import Benchmark, register

SMALL_RATIO = 16


def _routes(size: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 1 + (torch.rand(size["tokens"], generator=g) < size["p_big"]).long()  # 1 = small, 2 = big


def flops(size: dict, impl: str, mode: str) -> float:
    n_big = size["tokens"] if impl == "all-big" else int((_routes(size) == 2).sum())
    n_small = size["tokens"] - n_big
    fwd = 6 * size["D"] * (n_big * size["d_ff"] + n_small * size["d_ff"] // SMALL_RATIO)
    return fwd * (3.0 if mode == "fwd+bwd" else 1.0)


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    N, D, F_ = size["tokens"], size["D"], size["d_ff"]
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"

    def weights(f: int) -> SwiGLUWeights:
        shapes = ((f, D), (f, D), (D, f))
        return SwiGLUWeights(*((torch.randn(*s, generator=g) * s[1] ** -0.5).to(device, dtype) for s in shapes))

    small, big = weights(F_ // SMALL_RATIO), weights(F_)
    x = torch.randn(N, D, generator=g).to(device, dtype)
    params = [x, *small, *big]
    for p in params:
        p.requires_grad_(grad)
    route = _routes(size).to(device)
    if impl in ("triton", "torch"):
        fn = lambda: routed_ffn(x, route, small, big, impl=impl)  # noqa: E731
    elif impl == "all-big":
        fn = lambda: swiglu(x, big)  # noqa: E731
        params = [x, *big]
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if not grad:
        return torch.no_grad()(fn)
    dout = torch.randn(N, D, generator=g).to(device, dtype)
    return lambda: torch.autograd.grad(fn(), params, dout, allow_unused=True)


def skip(impl: str, device: str, dtype: str) -> str | None:
    if impl == "triton" and device != "cuda":
        return "the Triton kernels run on CUDA (on CPU only in the interpreter, for tests)"
    return None


def sizes(device: str) -> list[dict]:
    if device == "cuda":  # d_model 2048, d_ff 8192 (small 512)
        return [{"tokens": 16384, "D": 2048, "d_ff": 8192, "p_big": p} for p in (0.25, 0.5)]
    return [{"tokens": 2048, "D": 256, "d_ff": 1024, "p_big": p} for p in (0.25, 0.5)]


register(
    Benchmark(
        name="routed_ffn",
        description="DuoFFN hard routing (p_big of the tokens big, the rest small) vs every token through the big FFN",
        setup=setup,
        sizes=sizes,
        impls=("triton", "torch", "all-big"),
        baselines=("all-big",),
        flops=flops,
        skip=skip,
    )
)
