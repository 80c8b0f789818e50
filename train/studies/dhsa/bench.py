"""DHSA prefill of one attention layer against dense attention and fixed block-sparse (benchmark ``dhsa-prefill``).

One layer's attention on a prompt of T tokens (batch 1, 8 query heads, 2 key/value heads of 64 dims), forward
only (prefill), from the rotated q, k, v:

* ``DHSA``: chunking (key-similarity chunker), chunk selection and the block-sparse core, mode ``prefill``;
  ``DHSA selection``: its chunking and selection alone, timed apart;
* ``fixed block-sparse``: the same with fixed chunks (the paper's block-sparse baseline);
* ``dense SDPA``: causal ``scaled_dot_product_attention`` (fused, memory O(T));
* ``dense eager``: softmax(q kᵀ) v with the T×T scores materialised — what Hugging Face's Gemma-2 runs (its
  logit soft-capping rules out the fused kernels), i.e. the paper's dense baseline; not run where its scores
  would exceed 6 GiB.

The paper (Gemma-2-2B, 8k prefill) reports −20…−60% latency and −35% peak memory against dense.

    python -m train bench dhsa-prefill [--size T=8192,budget=1024,chunk=16,query_block=64]
"""

from __future__ import annotations

import torch

from arch import build_model
from arch.attention import causal_attention, causal_attention_probs
from kernels.bench.registry import Benchmark, register

EAGER_MAX_GIB = 6.0


def mixer(impl: str, size: dict, heads: int, kv_heads: int, head_dim: int):
    spec = {"type": "dense"}
    if impl != "dense SDPA" and impl != "dense eager":
        spec = {
            "type": "dhsa",
            "budget": size["budget"],
            "mode": "prefill",
            "query_block": size["query_block"],
            "chunker": "fixed" if impl == "fixed block-sparse" else "similarity",
            "chunk_size": size["chunk"],
        }
    cfg = {"d_model": heads * head_dim, "n_layers": 1, "n_heads": heads, "n_kv_heads": kv_heads}
    return build_model({**cfg, "max_seq_len": size["T"], "mixer": spec}).blocks[0].mixer.eval()


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention with the probabilities materialised ([B, H, T, T]) -> [B, T, H, hd]."""
    p = causal_attention_probs(q, k)  # [B, H, T, T]
    return torch.einsum("bhij,bjhd->bihd", p, v.repeat_interleave(q.shape[2] // v.shape[2], dim=2))


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    T, heads, kv_heads, hd = size["T"], 8, 2, 64
    if impl == "dense eager" and heads * T * T * dtype.itemsize / 2**30 > EAGER_MAX_GIB:
        raise ValueError(f"dense eager: T×T scores would need more than {EAGER_MAX_GIB} GiB")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, heads, hd, generator=g).to(device, dtype)
    k, v = (torch.randn(1, T, kv_heads, hd, generator=g).to(device, dtype) for _ in range(2))
    m = mixer(impl.removesuffix(" selection"), size, heads, kv_heads, hd).to(device)
    fn = {
        "dense SDPA": lambda: causal_attention(q, k, v, "sdpa"),
        "dense eager": lambda: eager(q, k, v),
        "DHSA selection": lambda: m.select(q, k),
    }.get(impl, lambda: m.attend(q, k, v))
    return torch.no_grad()(fn)


register(
    Benchmark(
        name="dhsa-prefill",
        description="DHSA prefill of one layer (8 / 2 heads x 64, batch 1) vs dense and fixed block-sparse",
        setup=setup,
        sizes=lambda device: [
            {"T": T, "budget": 1024, "chunk": 16, "query_block": 64} for T in (4096, 8192, 16384, 32768)
        ],
        impls=("DHSA", "DHSA selection", "fixed block-sparse", "dense SDPA", "dense eager"),
        baselines=("dense SDPA", "dense eager"),
        modes=("prefill",),
    )
)
