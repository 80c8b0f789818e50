"""The public entry ``block_sparse_attention``: checks its arguments, then runs the chosen implementation."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..common import resolve_impl
from .naive import naive_block_sparse_attention
from .pytorch import torch_block_sparse_attention

Impl = Literal["auto", "naive", "torch", "triton"]
IMPLS = ("auto", "naive", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*TRITON_DTYPES, torch.float64)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor,
    *,
    block_size: int,
    q_block_size: int | None = None,
    causal: bool = False,
    token_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Softmax attention of each query over the key blocks selected for its query block.

    Args:
        q: [B, Tq, H, hd]; k, v: [B, Tk, Hkv, hd], H a multiple of Hkv (grouped-query attention); one floating
            dtype for all three (the Triton kernels: float32, float16, bfloat16, hd <= 256).
        kv_blocks: integer [B, Hs, ceil(Tq / q_block_size), S]: key-block indices (blocks of ``block_size`` keys)
            for each query block (blocks of ``q_block_size`` queries); Hs = 1 (one selection shared by all
            heads) or H; -1 marks an unused slot. A block must not appear twice in a row.
        block_size: keys per key block (>= 1). q_block_size: queries per query block (>= 1; default
            ``block_size``; 1 = a selection per query).
        causal: query i never sees key j > i (positions count from 0 in both q and k).
        token_mask: bool [B, Hs, Tq, S]: whether query i sees the block in slot s of its query block, for
            selections that differ between the queries of one block.
        key_mask: bool [B, Tk]: False = that key is never seen (padding).
        scale: logit scale, default hd**-0.5.
        impl: ``"naive"`` (the definition: a dense mask), ``"torch"`` (the PyTorch path: tiled by query block or by
            key block, chosen per call), ``"triton"`` (the kernels; on CPU tensors only in the Triton
            interpreter), ``"auto"`` (Triton on CUDA tensors of a Triton dtype, else ``"torch"``).

    Returns:
        [B, Tq, H, hd] in q's dtype. Keys beyond Tk in the last, partial block are masked; a query that sees no
        key outputs zeros (and passes no gradient).

    Raises:
        ValueError: shapes, dtypes, devices or block indices that do not fit together (the message says which).
    """
    qbs = block_size if q_block_size is None else q_block_size
    _check(q, k, v, kv_blocks, block_size, qbs, token_mask, key_mask)
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else float(scale)
    reason = None
    if q.dtype not in TRITON_DTYPES:
        reason = f"does not take {q.dtype} (float32, float16, bfloat16 only)"
    elif hd > 256:
        reason = f"takes head dims up to 256, not {hd}"
    impl = resolve_impl("block_sparse_attention", impl, IMPLS, q.device, "torch", reason)
    run = {"naive": naive_block_sparse_attention, "torch": torch_block_sparse_attention}.get(impl)
    if run is None:
        from .triton import triton_block_sparse_attention as run
    return run(
        q,
        k,
        v,
        kv_blocks,
        block_size=block_size,
        q_block_size=qbs,
        causal=causal,
        token_mask=token_mask,
        key_mask=key_mask,
        scale=scale,
    )


def _check(q, k, v, kv_blocks, bs: int, qbs: int, token_mask, key_mask) -> None:
    """ValueError naming the first argument that does not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected [B, T, heads, hd], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd:
        raise ValueError(f"k, v: expected [{B}, Tk, Hkv, {hd}] each, got {list(k.shape)}, {list(v.shape)}")
    if min(Tq, Tk, H, hd) < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"q, k: need T >= 1, hd >= 1 and H={H} a multiple of Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q, k, v: one dtype of {FLOAT_DTYPES} expected, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == kv_blocks.device):
        raise ValueError(
            f"q, k, v, kv_blocks: one device expected, got {q.device}, {k.device}, {v.device}, {kv_blocks.device}"
        )
    if bs < 1 or qbs < 1:
        raise ValueError(f"block_size ({bs}) and q_block_size ({qbs}) must be >= 1")
    nqb, nkb = math.ceil(Tq / qbs), math.ceil(Tk / bs)
    if kv_blocks.dim() != 4 or kv_blocks.shape[:3] not in ((B, 1, nqb), (B, H, nqb)):
        raise ValueError(f"kv_blocks: expected shape [{B}, 1 or {H}, {nqb}, S], got {list(kv_blocks.shape)}")
    if kv_blocks.is_floating_point() or kv_blocks.dtype == torch.bool:
        raise ValueError(f"kv_blocks: expected an integer tensor, got {kv_blocks.dtype}")
    if kv_blocks.numel() and kv_blocks.device.type != "meta":
        lo, hi = int(kv_blocks.min()), int(kv_blocks.max())
        if lo < -1 or hi >= nkb:
            raise ValueError(f"kv_blocks: block indices must be in [0, {nkb}) or -1, got values in [{lo}, {hi}]")
    Hs, S = kv_blocks.shape[1], kv_blocks.shape[3]
    if token_mask is not None and (token_mask.shape != (B, Hs, Tq, S) or token_mask.dtype != torch.bool):
        raise ValueError(
            f"token_mask: expected bool [{B}, {Hs}, {Tq}, {S}], got {token_mask.dtype} {list(token_mask.shape)}"
        )
    if key_mask is not None and (key_mask.shape != (B, Tk) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask: expected bool [{B}, {Tk}], got {key_mask.dtype} {list(key_mask.shape)}")
