"""``impl="torch"``: the PyTorch path, forward and backward, choosing per call between two ways to tile the work.

* ``chunked.BlockSparseAttention``: by query block, each block over the key blocks it selected;
* ``per_query.PairAttention``: by key block, each block over the queries that selected it; for per-query
  selections (``q_block_size == 1``) and for per-token masks under which the queries of a block select far fewer
  blocks than their union (1-D causal BRA with query blocks: each query picks ~3 regions, a block of 16 queries
  ~27), whose work by query block would be mostly masked away.

Both run every tile through ``tiles.py`` (PyTorch's fused flash-attention kernel on CPU) and recompute in the
backward pass from the output and its log-sum-exp, so training takes about the memory of dense fused attention.
Per-head selections (``Hs == H``) become a batch of single-head problems. Arguments as
``kernels.block_sparse.block_sparse_attention`` (already checked there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .chunked import BlockSparseAttention, plan
from .per_query import PairAttention, pair_chunks


def torch_block_sparse_attention(
    q, k, v, kv_blocks, *, block_size: int, q_block_size: int, causal: bool, token_mask, key_mask, scale: float
) -> torch.Tensor:
    B, Tq, H, hd = q.shape
    Tk = k.shape[1]
    bs, qbs = block_size, q_block_size
    if kv_blocks.shape[1] > 1:
        return _per_head(q, k, v, kv_blocks, bs, qbs, causal, token_mask, key_mask, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the tiles view K and V as rows of blocks
    kv_blocks = kv_blocks[:, 0].long()  # [B, nqb, S]
    token_mask = None if token_mask is None else token_mask[:, 0]  # [B, Tq, S]
    nqb, nkb = math.ceil(Tq / qbs), math.ceil(Tk / bs)
    key_ok = torch.arange(nkb * bs, device=q.device) < Tk
    key_ok = key_ok & F.pad(key_mask, (0, nkb * bs - Tk)) if key_mask is not None else key_ok.expand(B, -1)
    k, v = (x if Tk == nkb * bs else F.pad(x, (0, 0, 0, 0, 0, nkb * bs - Tk)) for x in (k, v))
    if _by_key_block(kv_blocks, token_mask, qbs):
        chunks = pair_chunks(kv_blocks, token_mask, qbs, Tq, key_ok.view(B, nkb, bs), causal)
        return PairAttention.apply(q, k, v, chunks, key_ok.view(B, nkb, bs), causal, scale)
    if token_mask is not None:
        token_mask = F.pad(token_mask, (0, 0, 0, nqb * qbs - Tq))
    aligned = causal and Tq == Tk and qbs % bs == 0
    parts = plan(kv_blocks, token_mask, key_ok.view(B, nkb, bs), qbs, causal, aligned, key_mask is not None)
    q = q if Tq == nqb * qbs else F.pad(q, (0, 0, 0, 0, 0, nqb * qbs - Tq))
    return BlockSparseAttention.apply(q, k, v, parts, key_ok.view(B, nkb, bs), causal, scale, qbs)[:, :Tq]


def _by_key_block(kv_blocks, token_mask, qbs: int) -> bool:
    """Tile by key block: per-query selections, or per-token masks selecting under half of their blocks' union
    (the key-block tiles hold one block of keys and run at about half the rate of the query-block ones)."""
    if kv_blocks.device.type == "meta":  # FLOP counting: the query-block tiling needs no data
        return False
    if qbs == 1:
        return True
    if token_mask is None:
        return False
    used = kv_blocks >= 0  # [B, nqb, S]
    picked = token_mask & used.repeat_interleave(qbs, dim=1)[:, : token_mask.shape[1]]
    return 2 * int(picked.sum()) < int(used.sum()) * qbs


def _per_head(q, k, v, kv_blocks, bs, qbs, causal, token_mask, key_mask, scale):
    """A selection per head: B·H single-head problems (K and V repeated for grouped-query heads)."""
    B, Tq, H, hd = q.shape
    rep = H // k.shape[2]

    def fold(x):  # [B, T, H, hd] -> [B·H, T, 1, hd]
        return x.repeat_interleave(rep, dim=2).transpose(1, 2).reshape(B * H, -1, 1, hd)

    out = torch_block_sparse_attention(
        q.transpose(1, 2).reshape(B * H, Tq, 1, hd),
        fold(k),
        fold(v),
        kv_blocks.reshape(B * H, 1, *kv_blocks.shape[2:]),
        block_size=bs,
        q_block_size=qbs,
        causal=causal,
        token_mask=None if token_mask is None else token_mask.reshape(B * H, 1, *token_mask.shape[2:]),
        key_mask=None if key_mask is None else key_mask.repeat_interleave(H, dim=0),
        scale=scale,
    )
    return out.view(B, H, Tq, hd).transpose(1, 2)
