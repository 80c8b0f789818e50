"""Bi-level routing attention against its baselines (registered benchmarks ``bra-2d`` and ``bra-1d``).

* ``bra-2d``: the BiFormer-S stage-3 shape (14×14 tokens, width 256, 8 heads of 32, 7×7 regions of 2×2, top-16,
  batch 64): the block-sparse core against the gather reference (BiFormer's released algorithm, which copies
  the top-k regions of K and V for every query region).
* ``bra-1d``: one causal attention layer (batch 1, 4 heads of 64): causal BRA (routing + block-sparse core)
  against dense causal SDPA.

    python -m train bench bra-2d bra-1d [--size T=8192,region=64,topk=4,query_block=1] [--threads 1]
"""

from __future__ import annotations

import torch

from arch.attention import causal_attention
from arch.bra import causal_routing
from kernels.bench.registry import Benchmark, register
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.naive import gather_attention


def _call(fn, inputs: tuple, mode: str):
    """One call of ``fn(*inputs)``: under no_grad for ``fwd``, with every input gradient for ``fwd+bwd``."""
    if mode == "fwd":
        return torch.no_grad()(lambda: fn(*inputs))
    for x in inputs:
        x.requires_grad_()
    dout = torch.randn_like(fn(*inputs))
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)


def setup_2d(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    n_win, side, dim, hd, topk, B = 7, 14, 256, 32, 16, size["batch"]
    T, H = side * side, dim // hd
    q, k, v = (torch.randn(B, T, H, hd, generator=g).to(device, dtype) for _ in range(3))
    block = (side // n_win) ** 2  # tokens per region (region-major layout)
    mean = lambda t: t.reshape(B, n_win * n_win, block, dim).mean(2)  # noqa: E731
    sel = (mean(q) @ mean(k).transpose(1, 2)).topk(topk, -1).indices[:, None]  # [B, 1, 49, 16]
    fn = {"block-sparse core": block_sparse_attention, "gather reference": gather_attention}[impl]
    return _call(lambda q, k, v: fn(q, k, v, sel, block_size=block), (q, k, v), mode)


def setup_1d(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, size["T"], 4, 64, generator=g).to(device, dtype) for _ in range(3))
    region, qb = size["region"], size["query_block"]

    def bra(q, k, v):
        kv_blocks, token_mask = causal_routing(q, k, region, size["topk"], qb, attend_first=False)
        return block_sparse_attention(
            q, k, v, kv_blocks, block_size=region, q_block_size=qb, causal=True, token_mask=token_mask
        )

    fn = {"causal BRA": bra, "dense SDPA": lambda q, k, v: causal_attention(q, k, v, "sdpa")}[impl]
    return _call(fn, (q, k, v), mode)


register(
    Benchmark(
        name="bra-2d",
        description="2-D BRA at BiFormer-S stage 3: block-sparse core vs the released gather algorithm",
        setup=setup_2d,
        sizes=lambda device: [{"batch": 64}],
        impls=("block-sparse core", "gather reference"),
        baselines=("gather reference",),
    )
)
register(
    Benchmark(
        name="bra-1d",
        description="1-D causal BRA (routing + core) vs dense causal SDPA, one layer, 4 heads x 64",
        setup=setup_1d,
        sizes=lambda device: [{"T": T, "region": 64, "topk": 4, "query_block": 1} for T in (4096, 8192, 16384)],
        impls=("causal BRA", "dense SDPA"),
        baselines=("dense SDPA",),
    )
)
