"""``block_sparse``: the block-sparse core on one fixed causal selection, against dense attention.

Batch 1, ``H`` query heads over ``Hkv`` key/value heads of ``hd`` dims; every query block of ``block`` queries
sees its own (diagonal) block and ``selected - 1`` earlier key blocks drawn at random (fixed seed), the same
selection for all heads. Implementations:

* ``block-sparse``: ``kernels.block_sparse.block_sparse_attention`` (``impl="auto"``: on CUDA the Triton
  kernels plus building the selection's metadata, on CPU the PyTorch path);
* ``triton``: the Triton kernels alone, on metadata built beforehand (CUDA only);
* ``triton metadata``: building that metadata alone (``metadata.build_layout``: the tile lists and their
  transposed CSR), once per selection (CUDA only; one build serves forward and backward, so both columns time
  the same call);
* ``dense SDPA``: causal ``scaled_dot_product_attention`` over all keys (fused; flash on CUDA);
* ``flex``: FlexAttention compiled, with the same selection as its BlockMask (skipped where it does not compile);
* ``naive``: the definition, masked softmax with the T×T scores materialised (only up to T = 4096).

FLOPs: dense-equivalent, i.e. 4·block²·hd per attended (query block, key block) pair and head, the diagonal
block counted in full; dense SDPA its causal T²/2 work; fwd+bwd counted as 3.5× fwd (FlashAttention's convention).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.naive import dense_mask, reference_attention

from .registry import Benchmark, register


@functools.lru_cache(maxsize=4)
def selection(T: int, block: int, selected: int, seed: int = 0) -> torch.Tensor:
    """LongTensor [1, 1, nqb, selected]: the diagonal block and ``selected - 1`` random earlier blocks (-1 pads
    the first rows, which have fewer earlier blocks)."""
    g = torch.Generator().manual_seed(seed)
    n = math.ceil(T / block)
    rows = []
    for i in range(n):
        earlier = torch.randperm(i, generator=g)[: selected - 1] if i else torch.zeros(0, dtype=torch.long)
        row = torch.cat([earlier.sort().values, torch.tensor([i])])
        rows.append(F.pad(row, (0, selected - len(row)), value=-1))
    return torch.stack(rows)[None, None]


def attended_pairs(size: dict) -> int:
    return int((selection(size["T"], size["block"], size["selected"]) >= 0).sum())


def flops(size: dict, impl: str, mode: str) -> float:
    H, hd, T, bs = size["H"], size["hd"], size["T"], size["block"]
    if impl == "triton metadata":
        return None
    fwd = 4 * hd * H * (T * T / 2 if impl == "dense SDPA" else attended_pairs(size) * bs * bs)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    T, H, Hkv, hd, bs = size["T"], size["H"], size["Hkv"], size["hd"], size["block"]
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    q = torch.randn(1, T, H, hd, generator=g).to(device, dtype).requires_grad_(grad)
    k, v = (torch.randn(1, T, Hkv, hd, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(2))
    sel = selection(T, bs, size["selected"]).to(device)
    if impl == "block-sparse":
        attn = functools.partial(block_sparse_attention, kv_blocks=sel, block_size=bs, causal=True)
        fn = lambda: attn(q, k, v)  # noqa: E731
    elif impl in ("triton", "triton metadata"):
        from kernels.block_sparse.triton import build_layout, triton_block_sparse_attention

        build = functools.partial(build_layout, sel, T, T, block_size=bs, q_block_size=bs, causal=True)
        if impl == "triton metadata":
            return build
        attn = functools.partial(
            triton_block_sparse_attention,
            kv_blocks=sel,
            block_size=bs,
            q_block_size=bs,
            causal=True,
            token_mask=None,
            key_mask=None,
            scale=hd**-0.5,
            layout=build(),
        )
        fn = lambda: attn(q, k, v)  # noqa: E731
    elif impl == "dense SDPA":
        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=H != Hkv
        )
    elif impl == "flex":
        fn = _flex(q, k, v, sel, bs)
    elif impl == "naive":
        if T > 4096:
            raise ValueError("naive: T > 4096 would materialise T×T scores per head")
        mask = dense_mask(sel.cpu(), T, T, H, bs, bs, causal=True).to(device)
        rep = H // Hkv
        fn = lambda: reference_attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), mask)  # noqa: E731
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if not grad:
        return torch.no_grad()(fn)
    dout = torch.randn(fn().shape, generator=g).to(device, dtype)
    return lambda: torch.autograd.grad(fn(), (q, k, v), dout)


def _flex(q, k, v, sel, bs: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    allowed = torch.zeros(math.ceil(T / bs), math.ceil(T / bs), dtype=torch.bool, device=q.device)
    rows = sel[0, 0]
    for s in range(rows.shape[1]):
        ok = rows[:, s] >= 0
        allowed[torch.arange(len(rows), device=q.device)[ok], rows[ok, s]] = True

    def mask_mod(b, h, qi, ki):
        return allowed[qi // bs, ki // bs] & (ki <= qi)

    block_mask = create_block_mask(mask_mod, 1, 1, T, T, device=q.device.type, BLOCK_SIZE=bs)
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=H != Hkv)


def skip(impl: str, device: str, dtype: str) -> str | None:
    if impl.startswith("triton") and device != "cuda":
        return "the Triton kernels run on CUDA (on CPU only in the interpreter, for tests)"
    return None


def sizes(device: str) -> list[dict]:
    if device == "cuda":  # 1/8 of the key blocks (causal: fewer for the first rows), head dim 128
        return [{"T": T, "H": 16, "Hkv": 16, "hd": 128, "block": 128, "selected": T // 128 // 8} for T in (8192, 32768)]
    return [{"T": T, "H": 8, "Hkv": 2, "hd": 64, "block": 64, "selected": 17} for T in (4096, 8192, 16384)]


register(
    Benchmark(
        name="block_sparse",
        description="block-sparse attention on a fixed causal selection vs dense attention",
        setup=setup,
        sizes=sizes,
        impls=("block-sparse", "triton", "triton metadata", "dense SDPA", "flex", "naive"),
        baselines=("dense SDPA", "flex"),
        flops=flops,
        flops_label="TFLOP/s (dense-equiv.)",
        skip=skip,
    )
)
