"""The definition of block-sparse attention (``impl="naive"``; used by tests and benchmarks).

``dense_mask`` turns a block selection into the boolean [B, H, Tq, Tk] "query i may see key j" mask; the
definition of block-sparse attention is then plain masked softmax attention (``reference_attention``), and
``naive_block_sparse_attention`` is the two together, with the arguments of the public entry.
``gather_attention`` is the straightforward implementation of BiFormer's released code (ops/bra_legacy.py):
it gathers the top-k-fold copy of K and V for every query block and runs dense attention on it. It is the
memory-hungry baseline the chunked implementation is benchmarked against.
"""

from __future__ import annotations

import torch


def dense_mask(
    kv_blocks: torch.Tensor,  # [B, Hs, nqb, S] key-block index per slot, -1 = unused
    Tq: int,
    Tk: int,
    H: int,
    block_size: int,
    q_block_size: int,
    causal: bool = False,
    token_mask: torch.Tensor | None = None,  # [B, Hs, Tq, S] bool: query t may see slot s of its block
    key_mask: torch.Tensor | None = None,  # [B, Tk] bool: False = key never visible
) -> torch.Tensor:
    """The selection as a boolean mask [B, H, Tq, Tk]: True where query i attends to key j."""
    B, Hs, nqb, S = kv_blocks.shape
    dev = kv_blocks.device
    qblock = torch.arange(Tq, device=dev) // q_block_size  # [Tq] query block of each query
    kblock = torch.arange(Tk, device=dev) // block_size  # [Tk]
    slots = kv_blocks[:, :, qblock]  # [B, Hs, Tq, S]
    hit = slots[..., None] == kblock  # [B, Hs, Tq, S, Tk]: slot s of query i holds key j's block
    hit &= slots[..., None] >= 0
    if token_mask is not None:
        hit &= token_mask[..., None]
    mask = hit.any(dim=3)  # [B, Hs, Tq, Tk]
    if causal:
        mask &= torch.ones(Tq, Tk, dtype=torch.bool, device=dev).tril()
    if key_mask is not None:
        mask &= key_mask[:, None, None, :]
    return mask.expand(B, H, Tq, Tk)


def reference_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v; q [B, Tq, H, hd], k/v [B, Tk, H, hd], mask [B, H, Tq, Tk] -> [B, Tq, H, hd].

    A query that may see no key outputs zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def naive_block_sparse_attention(
    q, k, v, kv_blocks, *, block_size: int, q_block_size: int, causal: bool, token_mask, key_mask, scale: float
) -> torch.Tensor:
    """``kernels.block_sparse.block_sparse_attention`` by its definition: the dense [B, H, Tq, Tk] mask, then
    masked softmax attention with K and V repeated for grouped-query heads. Memory O(Tq·Tk) per head."""
    H, rep = q.shape[2], q.shape[2] // k.shape[2]
    mask = dense_mask(kv_blocks, q.shape[1], k.shape[1], H, block_size, q_block_size, causal, token_mask, key_mask)
    return reference_attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), mask, scale)


def gather_attention(q, k, v, kv_blocks, *, block_size: int, key_mask=None, scale: float | None = None):
    """BiFormer's released algorithm: for each query block, gather the S selected key blocks of K and V
    (a [B, H, nqb, S·block_size, hd] copy: S times the size of K and V) and attend densely over them.

    q, k, v: [B, T, H, hd], T a multiple of ``block_size``; query blocks = key blocks; kv_blocks [B, Hs, nqb, S]
    with no unused slot; key_mask [B, T] bool. Non-causal, no per-token mask (the 2-D BRA case)."""
    B, T, H, hd = q.shape
    n, S = T // block_size, kv_blocks.shape[-1]
    scale = hd**-0.5 if scale is None else scale
    idx = kv_blocks.expand(B, H, n, S)  # [B, H, n, S]
    bi, hi = torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None]

    def blocks(x):  # [B, T, H, hd] -> [B, H, n, bs, hd]
        return x.view(B, n, block_size, H, hd).permute(0, 3, 1, 2, 4)

    kg = blocks(k)[bi, hi, idx].flatten(3, 4)  # [B, H, n, S·bs, hd]  <- the top-k-fold copy
    vg = blocks(v)[bi, hi, idx].flatten(3, 4)
    s = (blocks(q) * scale) @ kg.transpose(-1, -2)  # [B, H, n, bs, S·bs]
    if key_mask is not None:
        km = key_mask.view(B, n, block_size)[bi, idx].flatten(3)  # [B, H, n, S·bs]
        s = s.masked_fill(~km[:, :, :, None, :], float("-inf"))
    out = s.softmax(-1) @ vg  # [B, H, n, bs, hd]
    return out.permute(0, 2, 3, 1, 4).reshape(B, T, H, hd)
