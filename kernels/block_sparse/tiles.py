"""Dense softmax attention over tiles, with the row log-sum-exp: the building block of the PyTorch paths.

A *tile* pairs some queries with some keys. ``tile_attention`` computes softmax attention of a batch of tiles
(an additive bias masks keys out) and returns the output and the log-sum-exp (lse) of every query row;
``merge`` combines two results over disjoint keys of the same rows (the split-KV merge of FlashDecoding);
``tile_attention_backward`` computes a tile's gradients from the *final* output O and lse of its rows
(FlashAttention's backward, Dao et al. 2022: P = exp(s − lse), dS = P ∘ (dP − rowsum(dO ∘ O))), so a query's
keys may be split over any number of tiles and their gradients summed, with nothing stored but O and lse.

On CPU both passes run PyTorch's fused flash-attention kernel: ``aten::_scaled_dot_product_flash_attention_for_cpu``
and its backward, the kernel behind ``F.scaled_dot_product_attention`` on CPU, called directly because the public
call returns no log-sum-exp. Elsewhere (CUDA tensors under ``impl="torch"``, the meta device of FLOP counting)
the same arithmetic runs in plain matmuls.

Shapes: q [n, h, L, hd]; k, v [n, h, S, hd]; bias in q's dtype, broadcastable to [n, h, L, S], 0 = visible and
-inf = masked, None = every key visible. A row that sees no key outputs 0 and its lse is undefined (the fused
kernel gives 0): callers that merge mark those rows with lse = -inf (``visible(...).any(-1)``).
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


def bias_of(ok: torch.Tensor, dtype: torch.dtype, rep: int = 1) -> torch.Tensor:
    """bool [n, L or 1, S] -> additive bias [n, 1, rep·L or 1, S] (0 / -inf) for queries stacked as rep groups
    of L rows (the query heads of one key/value head)."""
    bias = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, NEG_INF)[:, None]
    if rep == 1 or ok.shape[1] == 1:
        return bias
    n, _, L, S = bias.shape
    return bias.expand(n, rep, L, S).reshape(n, 1, rep * L, S)


def tile_attention(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale + bias) v per tile -> (o [n, h, L, hd] in q's dtype, lse [n, h, L] in float32 or
    wider)."""
    if q.device.type == "cpu":
        return _FORWARD(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return plain_attention(q, k, v, bias, scale)


def tile_attention_backward(dout, q, k, v, out, lse, bias, scale: float):
    """dq, dk, dv of one tile batch, from the final output ``out`` and ``lse`` of its rows ([n, h, L, hd] and
    [n, h, L]; lse finite: for a row that sees no key of the tile any value, it contributes nothing)."""
    if q.device.type == "cpu":
        return _BACKWARD(dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    return plain_attention_backward(dout, q, k, v, out, lse, bias, scale)


def plain_attention(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``tile_attention`` in plain matmuls (the [n, h, L, S] scores materialised)."""
    s = _scores(q, k, bias, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - _finite(lse)[..., None])  # a row that sees nothing: exp(-inf) = 0
    return (p.to(v.dtype) @ v).to(q.dtype), lse


def plain_attention_backward(dout, q, k, v, out, lse, bias, scale: float):
    """``tile_attention_backward`` in plain matmuls."""
    p = torch.exp(_scores(q, k, bias, scale) - lse[..., None])  # [n, h, L, S]
    delta = (dout.to(p.dtype) * out.to(p.dtype)).sum(-1, keepdim=True)  # rowsum(dO ∘ O)
    ds = (p * ((dout @ v.transpose(-1, -2)).to(p.dtype) - delta) * scale).to(q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, p.to(dout.dtype).transpose(-1, -2) @ dout


def merge(o1, lse1, o2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets of the same rows, from each one's result: o [..., hd],
    lse [...] with lse = -inf where the row saw no key of the set (its o is 0) -> (o, lse), the same way."""
    lse = torch.logaddexp(lse1, lse2)
    w2 = torch.exp(lse2 - _finite(lse))[..., None]  # the second set's share of the softmax mass
    return torch.lerp(o1.to(w2.dtype), o2.to(w2.dtype), w2).to(o1.dtype), lse


def _scores(q, k, bias, scale: float) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    return s if bias is None else s + bias


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)
