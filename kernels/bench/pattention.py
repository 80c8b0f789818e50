"""``pattention``: TokenFormer's Pattention (Eq. 5, ``l2_gelu``) as an FFN over ``n`` parameter tokens.

x [tokens, d] -> [tokens, d] with K, V [n, d] (2·n·d parameters). Implementations:

* ``fused``: ``kernels.pattention.pattention(impl="triton")``, the [tokens × n] scores never in memory (CUDA);
* ``naive``: the definition in PyTorch (scores, their norm and GeLU materialised; autograd saves them);
* ``gelu MLP``: ``Linear(d, n) → GELU → Linear(n, d)``, the same parameter count (the memory target);
* ``two matmuls``: ``(x Kᵀ) V``, the two GEMMs of the same shapes with nothing between (the time target).

FLOPs: the two GEMMs, 4·tokens·n·d forward; fwd+bwd counted as 3× forward.
(Moved here from ``train/bench_ops.py``'s ``pattention`` benchmark, which compared with the GELU MLP only.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.pattention import pattention

from .registry import Benchmark, register


def flops(size: dict, impl: str, mode: str) -> float:
    fwd = 4 * size["tokens"] * size["n"] * size["d"]
    return fwd * (3.0 if mode == "fwd+bwd" else 1.0)


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    M, d, n = size["tokens"], size["d"], size["n"]
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    x = torch.randn(M, d, generator=g).to(device, dtype).requires_grad_(grad)
    key = (torch.randn(n, d, generator=g) * 0.02).to(device, dtype).requires_grad_(grad)
    value = (torch.randn(n, d, generator=g) * 0.02).to(device, dtype).requires_grad_(grad)
    tau = torch.tensor(math.sqrt(n), device=device)
    if impl in ("fused", "naive"):
        which = "triton" if impl == "fused" else "naive"
        fn = lambda: pattention(x, key, value, tau, impl=which)  # noqa: E731
    elif impl == "gelu MLP":  # w_in = K [n, d] as Linear(d, n).weight, w_out = Vᵀ as Linear(n, d).weight
        w_out = value.detach().t().contiguous().requires_grad_(grad)
        fn = lambda: F.linear(F.gelu(F.linear(x, key)), w_out)  # noqa: E731
    elif impl == "two matmuls":
        fn = lambda: (x @ key.t()) @ value  # noqa: E731
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if not grad:
        return torch.no_grad()(fn)
    params = [t for t in (x, key, value) if t.requires_grad]
    if impl == "gelu MLP":
        params[-1] = w_out
    dout = torch.randn(M, d, generator=g).to(device, dtype)
    return lambda: torch.autograd.grad(fn(), params, dout)


def skip(impl: str, device: str, dtype: str) -> str | None:
    if impl == "fused" and device != "cuda":
        return "the Triton kernels run on CUDA (on CPU only in the interpreter, for tests)"
    return None


def sizes(device: str) -> list[dict]:
    if device == "cuda":  # d = 1024 (TokenFormer-450M), n = d (projections) and 4d (FFN)
        return [{"tokens": M, "d": 1024, "n": n} for M in (8192, 32768) for n in (1024, 4096)]
    return [{"tokens": 2048, "d": 256, "n": n} for n in (256, 1024)]


register(
    Benchmark(
        name="pattention",
        description="Pattention FFN (l2_gelu) vs a GELU MLP of the same parameter count and two plain matmuls",
        setup=setup,
        sizes=sizes,
        impls=("fused", "naive", "gelu MLP", "two matmuls"),
        baselines=("two matmuls", "gelu MLP"),
        flops=flops,
        skip=skip,
    )
)
