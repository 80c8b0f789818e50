"""``impl="torch"``: the best PyTorch path, chosen per call among the three PyTorch implementations.

* ``inference.shared_selection_attention`` when no gradient is needed, one selection serves all heads
  (``Hs == 1``) and query blocks hold more than one query;
* ``per_query.per_query_attention`` for per-query selections (``q_block_size == 1``);
* ``chunked.BlockSparseAttention`` (an autograd.Function that trains with about the memory of K and V)
  otherwise.

Arguments as ``kernels.block_sparse.block_sparse_attention`` (already checked there); ``key_ok`` [B, nkb·bs]
combines the key mask with the ragged tail of the last key block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .chunked import BlockSparseAttention
from .inference import shared_selection_attention
from .per_query import per_query_attention


def torch_block_sparse_attention(
    q, k, v, kv_blocks, *, block_size: int, q_block_size: int, causal: bool, token_mask, key_mask, scale: float
) -> torch.Tensor:
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    bs, qbs = block_size, q_block_size
    nqb, nkb = math.ceil(Tq / qbs), math.ceil(Tk / bs)
    Hs, S = kv_blocks.shape[1], kv_blocks.shape[3]
    key_ok = torch.arange(nkb * bs, device=q.device) < Tk
    key_ok = key_ok & F.pad(key_mask, (0, nkb * bs - Tk)) if key_mask is not None else key_ok.expand(B, -1)
    if (
        Hs == 1
        and qbs > 1
        and q.device.type != "meta"
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    ):
        return _shared_selection(q, k, v, kv_blocks[:, 0], bs, qbs, causal, token_mask, key_ok, scale)
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    N = B * H

    def blocks(x, n, size):  # [B, T, H, hd] -> [N, n, size, hd], zero-padded to n·size
        x = F.pad(x, (0, 0, 0, 0, 0, n * size - x.shape[1]))
        return x.view(B, n, size, H, hd).permute(0, 3, 1, 2, 4).reshape(N, n, size, hd)

    idx = kv_blocks.expand(B, H, nqb, S).reshape(N, nqb, S)
    slot_ok, idx = idx >= 0, idx.clamp_min(0)
    if token_mask is not None:
        token_mask = F.pad(token_mask, (0, 0, 0, nqb * qbs - Tq))  # [B, Hs, nqb·qbs, S]
        token_mask = token_mask.view(B, Hs, nqb, qbs, S).expand(B, H, nqb, qbs, S).reshape(N, nqb, qbs, S)
    key_ok = key_ok.view(B, 1, nkb, bs).expand(B, H, nkb, bs).reshape(N, nkb, bs)
    if qbs == 1 and q.device.type != "meta":  # per-query selections: group queries by key block (the meta
        # device, used for FLOP counting, cannot run its data-dependent grouping and takes the chunked path)
        ok = slot_ok if token_mask is None else slot_ok & token_mask.view(N, nqb, S)
        out = per_query_attention(
            blocks(q, nqb, 1).view(N, Tq, hd),
            blocks(k, nkb, bs),
            blocks(v, nkb, bs),
            torch.where(ok, idx, -1),
            key_ok,
            causal,
            scale,
        )
        return out.view(B, H, Tq, hd).transpose(1, 2)
    chunk = max(1, nkb // max(2 * S, 1))  # query blocks per chunk: gathered keys ~ Tk / 2
    out = BlockSparseAttention.apply(
        blocks(q, nqb, qbs),
        blocks(k, nkb, bs),
        blocks(v, nkb, bs),
        idx,
        slot_ok,
        token_mask,
        key_ok,
        causal,
        scale,
        chunk,
    )  # [N, nqb, qbs, hd]
    return out.view(B, H, nqb * qbs, hd)[:, :, :Tq].transpose(1, 2)


def _shared_selection(q, k, v, idx, bs, qbs, causal, token_mask, key_ok, scale):
    """Forward only, one selection for all heads (idx [B, nqb, S], key_ok [B, nkb·bs]):
    ``inference.shared_selection_attention`` on its layout."""
    B, Tq, H, hd = q.shape
    nqb, S, nkb = idx.shape[1], idx.shape[2], key_ok.shape[1] // bs

    def pad(x, n, size):  # [B, T, h, hd] -> [B, n, size, h, hd]; a view when T = n·size
        x = x if x.shape[1] == n * size else F.pad(x, (0, 0, 0, 0, 0, n * size - x.shape[1]))
        return x.view(B, n, size, *x.shape[2:])

    if token_mask is not None:
        token_mask = F.pad(token_mask[:, 0], (0, 0, 0, nqb * qbs - Tq)).view(B, nqb, qbs, S)
    out = shared_selection_attention(
        pad(q, nqb, qbs),
        pad(k, nkb, bs),
        pad(v, nkb, bs),
        idx.clamp_min(0),
        idx >= 0,
        token_mask,
        key_ok.view(B, nkb, bs),
        causal,
        scale,
        max(1, nkb // max(8 * S, 1)),  # gathered keys ~ Tk / 8
    )  # [B, nqb, qbs, H, hd]
    return out.view(B, nqb * qbs, H, hd)[:, :Tq]
