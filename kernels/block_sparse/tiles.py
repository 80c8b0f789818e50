"""Dense softmax attention over tiles, with the row log-sum-exp: the building block of the PyTorch paths.

A *tile* pairs some queries with some keys. ``tile_attention`` computes softmax attention of a batch of tiles
(an additive bias masks keys out) and returns the output and the log-sum-exp (lse) of every query row;
``tile_attention_backward`` computes a tile's gradients from the *final* output O and lse of its rows
(FlashAttention's backward, Dao et al. 2022: P = exp(s − lse), dS = P ∘ (dP − rowsum(dO ∘ O))), so a query's
keys may be split over any number of tiles and their gradients summed, with nothing stored but O and lse.

On CPU both passes run PyTorch's fused flash-attention kernel: ``aten::_scaled_dot_product_flash_attention_for_cpu``
and its backward, the kernel behind ``F.scaled_dot_product_attention`` on CPU, called directly because the public
call returns no log-sum-exp, with grouped-query heads stacked as rows (``stack_heads``). Elsewhere (CUDA tensors
under ``impl="torch"``, the meta device of FLOP counting) the same arithmetic runs in plain matmuls.

Shapes: q [n, h, L, hd]; k, v [n, hkv, S, hd] with h a multiple of hkv (grouped-query heads: query head i reads
key/value head i // (h / hkv)); any strides; bias in q's dtype, broadcastable to [n, 1, L, S], 0 = visible and
-inf = masked, None = every key visible. A row that sees no key outputs 0 and its lse is undefined (the fused
kernel gives 0, the plain matmuls -inf).
"""

from __future__ import annotations

import torch

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def visible(key_ok: torch.Tensor, kpos: torch.Tensor | None, qpos: torch.Tensor | None) -> torch.Tensor:
    """Which (query, key) pairs of gathered keys are visible: key_ok [..., 1 or L, S] (slot used, key inside the
    sequence, not masked out), and under a causal mask (``kpos`` [..., S] key positions, ``qpos`` [..., L] query
    positions; None = not causal) key position <= query position. -> bool [..., L or 1, S]."""
    if kpos is None:
        return key_ok
    return key_ok & (kpos[..., None, :] <= qpos[..., :, None])


def bias_of(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [n, L or 1, S] -> additive bias [n, 1, L or 1, S] (0 / -inf)."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, NEG_INF)[:, None]


def tile_attention(q, k, v, bias, scale: float, *, out=None):
    """softmax(q kᵀ · scale + bias) v per tile -> (o [n, h, L, hd] in q's dtype, lse [n, h, L] in float32 or
    wider). ``out``: views (o, lse) of those shapes the results are written into and returned (one copy fewer
    than copying the returned tensors)."""
    o_out, lse_out = (None, None) if out is None else out
    if q.device.type == "cpu":
        rep = q.shape[1] // k.shape[1]
        o, lse = _FORWARD(stack_heads(q, rep), k, v, 0.0, False, attn_mask=_stack_bias(bias, rep), scale=scale)[:2]
        return unstack_heads(o, rep, o_out), unstack_heads(lse, rep, lse_out)
    o, lse = plain_attention(q, k, v, bias, scale)
    return (o, lse) if out is None else (o_out.copy_(o), lse_out.copy_(lse))


def tile_attention_backward(dout, q, k, v, out, lse, bias, scale: float, *, causal: bool = False, dq_out=None):
    """dq, dk, dv of one tile batch, from the final output ``out`` and ``lse`` of its rows ([n, h, L, hd] and
    [n, h, L]; lse finite: for a row that sees no key of the tile any value, it contributes nothing). ``causal``:
    square tiles (L = S) in which query i sees keys 0..i, with no bias (a block's own keys: the fused kernel's
    causal flag, grouped-query heads read in place, no stacked rows); ``dq_out``: a view [n, h, L, hd] dq is
    written into and returned."""
    if causal and (q.shape[2] != k.shape[2] or bias is not None):
        raise ValueError(f"a causal tile is square with no bias; got {q.shape[2]} queries, {k.shape[2]} keys")
    if q.device.type == "cpu":
        rep = 1 if causal else q.shape[1] // k.shape[1]  # the kernel's causal flag is per row: heads read in place
        dout, q, out, lse = (stack_heads(x, rep) for x in (dout, q, out, lse))
        mask = _stack_bias(bias, rep)
        dq, dk, dv = _BACKWARD(dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
        return unstack_heads(dq, rep, dq_out), dk, dv
    dq, dk, dv = plain_attention_backward(
        dout, q, k, v, out, lse, causal_bias(q.shape[2], q.dtype, q.device) if causal else bias, scale
    )
    return (dq if dq_out is None else dq_out.copy_(dq)), dk, dv


def stack_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """The ``rep`` query heads that share a key/value head as the rows of one head: x [n, h, L, ...] (per query
    head i, query t) -> [n, h / rep, L·rep, ...], row t·rep + j = query t of head (i // rep)·rep + j (a copy;
    x itself when rep is 1). The fused CPU kernel splits a tile's rows into blocks of 32 below 192 rows and of 64
    from 192 on (``FlashAttentionKernel.cpp``): 64 queries of 3 heads become 192 rows split by 64."""
    if rep == 1:
        return x
    n, h, L = x.shape[:3]
    return x.unflatten(1, (h // rep, rep)).transpose(2, 3).reshape(n, h // rep, L * rep, *x.shape[3:])


def unstack_heads(x: torch.Tensor, rep: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``stack_heads``: [n, hkv, L·rep, ...] -> [n, hkv·rep, L, ...], written into ``out`` (any
    strides) if given."""
    if rep > 1:
        n, hkv, R = x.shape[:3]
        x = x.unflatten(2, (R // rep, rep)).transpose(2, 3)  # [n, hkv, rep, L, ...]
        if out is None:
            return x.reshape(n, hkv * rep, R // rep, *x.shape[4:])
        out.unflatten(1, (hkv, rep)).copy_(x)
        return out
    return x if out is None else out.copy_(x)


def _stack_bias(bias: torch.Tensor | None, rep: int) -> torch.Tensor | None:
    """A bias broadcastable to [n, 1, L, S] for the rows of ``stack_heads`` (each query's row repeated ``rep``
    times; a bias expanded over tiles is stacked once and expanded again)."""
    if bias is None or rep == 1 or bias.shape[2] == 1:
        return bias
    if bias.shape[0] > 1 and bias.stride(0) == 0:
        return bias[:1].repeat_interleave(rep, 2).expand(bias.shape[0], -1, -1, -1)
    return bias.repeat_interleave(rep, 2)


def plain_attention(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``tile_attention`` in plain matmuls (the [n, h, L, S] scores materialised)."""
    s = _scores(q, k, bias, scale)  # [n, hkv, rep, L, S]
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - _finite(lse)[..., None])  # a row that sees nothing: exp(-inf) = 0
    return (p.to(v.dtype) @ v[:, :, None]).flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def plain_attention_backward(dout, q, k, v, out, lse, bias, scale: float):
    """``tile_attention_backward`` in plain matmuls."""
    hkv = k.shape[1]
    p = torch.exp(_scores(q, k, bias, scale) - lse.unflatten(1, (hkv, -1))[..., None])  # [n, hkv, rep, L, S]
    dout, q = dout.unflatten(1, (hkv, -1)), q.unflatten(1, (hkv, -1))
    delta = (dout.to(p.dtype) * out.unflatten(1, (hkv, -1)).to(p.dtype)).sum(-1, keepdim=True)  # rowsum(dO ∘ O)
    ds = (p * ((dout @ v[:, :, None].transpose(-1, -2)).to(p.dtype) - delta) * scale).to(q.dtype)
    dq = (ds @ k[:, :, None]).flatten(1, 2)
    dk = (ds.transpose(-1, -2) @ q).sum(2)
    dv = (p.to(dout.dtype).transpose(-1, -2) @ dout).sum(2)
    return dq, dk, dv


def causal_bias(L: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The bias [1, 1, L, L] of a causal square tile: 0 on and below the diagonal, -inf above."""
    return bias_of(torch.ones(L, L, dtype=torch.bool, device=device).tril()[None], dtype)


def _scores(q, k, bias, scale: float) -> torch.Tensor:
    """q [n, h, L, hd], k [n, hkv, S, hd] -> scaled, biased scores [n, hkv, h / hkv, L, S] (grouped-query heads
    of one key/value head together)."""
    q = q.unflatten(1, (k.shape[1], -1))
    s = (q @ k[:, :, None].transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    return s if bias is None else s + bias[:, :, None]


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)
