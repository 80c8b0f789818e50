"""Block-sparse attention in plain PyTorch that trains with about the memory of K and V themselves.

The query blocks are processed in chunks. A chunk gathers only the key blocks its query blocks selected
(chunks are sized so that this copy is about as large as K), computes masked softmax attention, and keeps only
the output and the row log-sum-exp. The backward pass recomputes each chunk's probabilities from the
log-sum-exp (FlashAttention's recurrence, Dao et al. 2022) and scatter-adds dK, dV into the selected blocks,
so neither pass ever holds the S-fold copy of K and V (BiFormer's released code does: ~100 GB at 600×500,
rayleizhu/BiFormer#21) nor a dense T×T score matrix.

Canonical layout (built by ``kernels.block_sparse.block_sparse_attention``; N = batch·heads):
q [N, nqb, qbs, hd]; k, v [N, nkb, bs, hd]; idx [N, nqb, S] (key block per slot, clamped to >= 0);
slot_ok [N, nqb, S]; token_mask [N, nqb, qbs, S] or None; key_ok [N, nkb, bs].
"""

from __future__ import annotations

import torch


def _chunk(q, k, v, idx, slot_ok, token_mask, key_ok, causal: bool, c0: int, c1: int):
    """Gathered K, V and the visibility mask of query blocks c0..c1-1.

    -> kg, vg [N, nc, S·bs, hd]; allowed [N, nc, qbs or 1, S·bs] bool."""
    N, nkb, bs, _ = k.shape
    qbs = q.shape[2]
    idx_c = idx[:, c0:c1]  # [N, nc, S]
    rows = torch.arange(N, device=q.device)[:, None, None]
    kg, vg = k[rows, idx_c].flatten(2, 3), v[rows, idx_c].flatten(2, 3)  # [N, nc, S·bs, hd]
    allowed = (key_ok[rows, idx_c] & slot_ok[:, c0:c1, :, None])[:, :, None]  # [N, nc, 1, S, bs]
    if token_mask is not None:
        allowed = allowed & token_mask[:, c0:c1, :, :, None]  # [N, nc, qbs, S, bs]
    if causal:
        kpos = idx_c[..., None] * bs + torch.arange(bs, device=q.device)  # [N, nc, S, bs]
        qpos = torch.arange(c0 * qbs, c1 * qbs, device=q.device).view(c1 - c0, qbs)  # [nc, qbs]
        allowed = allowed & (kpos[:, :, None] <= qpos[None, :, :, None, None])  # [N, nc, qbs, S, bs]
    return kg, vg, allowed.flatten(-2)


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, slot_ok, token_mask, key_ok, causal: bool, scale: float, chunk: int):
        N, nqb, qbs, hd = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax statistics and gradient sums
        out = torch.empty_like(q)
        lse = torch.empty(N, nqb, qbs, dtype=acc, device=q.device)  # log-sum-exp per query row
        for c0 in range(0, nqb, chunk):
            c1 = min(c0 + chunk, nqb)
            kg, vg, allowed = _chunk(q, k, v, idx, slot_ok, token_mask, key_ok, causal, c0, c1)
            s = (q[:, c0:c1] @ kg.transpose(-1, -2)).to(acc) * scale  # [N, nc, qbs, S·bs]
            s = s.masked_fill(~allowed, float("-inf"))
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, 0.0)  # rows that see no key
            p = torch.exp(s - m)
            l = p.sum(-1, keepdim=True)  # noqa: E741
            out[:, c0:c1] = ((p.to(v.dtype) @ vg) / torch.where(l > 0, l, 1.0).to(v.dtype)).to(q.dtype)
            lse[:, c0:c1] = torch.where(l > 0, m + l.log(), float("inf")).squeeze(-1)  # inf -> p = 0 in backward
        ctx.save_for_backward(q, k, v, out, lse, idx, slot_ok, token_mask, key_ok)
        ctx.causal, ctx.scale, ctx.chunk = causal, scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, idx, slot_ok, token_mask, key_ok = ctx.saved_tensors
        N, nqb, qbs, hd = q.shape
        nkb, bs = k.shape[1], k.shape[2]
        acc = lse.dtype
        dout = dout.contiguous()
        delta = (dout.to(acc) * out.to(acc)).sum(-1)  # [N, nqb, qbs] = rowsum(dO ∘ O)
        dq = torch.zeros_like(q)
        dk = torch.zeros(N * nkb, bs, hd, dtype=acc, device=k.device)
        dv = torch.zeros_like(dk)
        base = (torch.arange(N, device=q.device) * nkb)[:, None, None]
        for c0 in range(0, nqb, ctx.chunk):
            c1 = min(c0 + ctx.chunk, nqb)
            kg, vg, allowed = _chunk(q, k, v, idx, slot_ok, token_mask, key_ok, ctx.causal, c0, c1)
            qc, doc = q[:, c0:c1], dout[:, c0:c1]
            s = (qc @ kg.transpose(-1, -2)).to(acc) * ctx.scale
            p = torch.exp(s.masked_fill(~allowed, float("-inf")) - lse[:, c0:c1, :, None])  # [N, nc, qbs, S·bs]
            dp = (doc @ vg.transpose(-1, -2)).to(acc)
            ds = (p * (dp - delta[:, c0:c1, :, None]) * ctx.scale).to(q.dtype)
            dq[:, c0:c1] = ds @ kg
            flat = (idx[:, c0:c1] + base).flatten()  # [N·nc·S] rows of dk/dv
            nc, S = c1 - c0, idx.shape[-1]
            dk.index_add_(0, flat, (ds.transpose(-1, -2) @ qc).to(acc).view(N * nc * S, bs, hd))
            dv.index_add_(0, flat, (p.to(doc.dtype).transpose(-1, -2) @ doc).to(acc).view(N * nc * S, bs, hd))
        shape = (N, nkb, bs, hd)
        return dq, dk.view(shape).to(k.dtype), dv.view(shape).to(v.dtype), None, None, None, None, None, None, None
