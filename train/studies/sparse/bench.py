"""The sparse mixers' training step against dense attention (registered benchmark ``sparse-train``).

One causal attention layer (batch 1, 8 query heads over 2 key/value heads of 64 dims, float32), forward and
backward from the rotated q, k, v: the part of the layer where the mixers differ (selection and attention; the
projections are the same for all), timed interleaved in one process, peak memory per cell in fresh processes:

* ``dense SDPA``: causal ``scaled_dot_product_attention`` (the fused kernel);
* ``causal BRA``: 1-D causal bi-level routing attention (``mixer: {type: bra, region_size: region, topk}``),
  query blocks of a region (the config default);
* ``causal BRA (per query)``: the same with ``query_block: 1`` (a selection per query);
* ``DHSA causal``: DHSA's training mode (key-similarity chunks, ``budget`` keys per query block of 64);
* ``fixed block-sparse``: DHSA with fixed chunks of ``chunk`` tokens (the paper's block-sparse baseline);
* ``DHSA selection``: ``DHSA causal``'s selection alone (chunking, chunk scores, budgeted key lists; no
  gradient), timed apart: its time ÷ ``DHSA causal`` is the selection's share of the step.

Inputs are random, so routing and chunk scores are those of unstructured keys.

    python -m train bench sparse-train [--size T=8192,region=64,topk=4,budget=1024,chunk=16] [--threads 2]
"""

from __future__ import annotations

import torch

from arch import build_model
from kernels.bench.registry import Benchmark, register

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def mixer_spec(impl: str, size: dict) -> dict:
    """The mixer config of one implementation (``DHSA selection``: ``DHSA causal``'s)."""
    bra = {"type": "bra", "region_size": size["region"], "topk": size["topk"]}
    dhsa = {"type": "dhsa", "mode": "causal", "budget": size["budget"], "query_block": 64}
    return {
        "dense SDPA": {"type": "dense"},
        "causal BRA": bra,
        "causal BRA (per query)": {**bra, "query_block": 1},
        "DHSA causal": {**dhsa, "chunker": "similarity"},
        "DHSA selection": {**dhsa, "chunker": "similarity"},
        "fixed block-sparse": {**dhsa, "chunker": "fixed", "chunk_size": size["chunk"]},
    }[impl]


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    cfg = {"d_model": HEADS * HEAD_DIM, "n_layers": 1, "n_heads": HEADS, "n_kv_heads": KV_HEADS}
    layer = build_model({**cfg, "max_seq_len": size["T"], "mixer": mixer_spec(impl, size)}).blocks[0].mixer
    layer = layer.to(device, dtype).train()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, size["T"], HEADS, HEAD_DIM, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(1, size["T"], KV_HEADS, HEAD_DIM, generator=g).to(device, dtype).requires_grad_() for _ in "kv")
    if impl == "DHSA selection":
        return lambda: layer.select(q, k)
    dout = torch.randn(q.shape, generator=g).to(device, dtype)
    return lambda: torch.autograd.grad(layer.attend(q, k, v), (q, k, v), dout)


register(
    Benchmark(
        name="sparse-train",
        description="training step (fwd+bwd) of one attention layer, 8 / 2 heads x 64, batch 1: sparse mixers vs dense",
        setup=setup,
        sizes=lambda device: [
            {"T": T, "region": 64, "topk": 4, "budget": 1024, "chunk": 16} for T in (4096, 8192, 16384)
        ],
        impls=(
            "causal BRA",
            "causal BRA (per query)",
            "DHSA causal",
            "DHSA selection",
            "fixed block-sparse",
            "dense SDPA",
        ),
        baselines=("dense SDPA", "DHSA causal"),
        modes=("fwd+bwd",),
    )
)
