"""Block-sparse attention by query blocks, forward and backward, with about the memory of K and V themselves.

The query blocks are processed in chunks. A chunk gathers only the key blocks its query blocks selected (chunks
are sized so that this copy is about half as large as K) and runs ``tiles.tile_attention`` on them, the query heads of
each key/value head stacked along the query length, so grouped-query heads share one copy of the gathered keys.
The selected blocks of a query block form two tiles (``split_slots``): blocks that every query of the block sees
whole (under a causal mask, the blocks before the query block; no per-token mask) need only a per-key bias,
shared by all rows; the others (the diagonal block, per-token masks) a per-(query, key) bias. The two results are
merged by their log-sum-exp. Only the output and the row log-sum-exp are kept: the backward pass recomputes each
chunk (``tiles.tile_attention_backward``) and scatter-adds dK, dV into the selected blocks, so neither pass holds
the S-fold copy of K and V (BiFormer's released code does: ~100 GB at 600×500, rayleizhu/BiFormer#21) nor a T×T
score matrix. Without gradients this is the forward pass alone.

Canonical layout (built by ``pytorch.torch_block_sparse_attention``; one selection for all heads):
q [B, nqb·qbs, H, hd]; k, v [B, nkb·bs, Hkv, hd]; the ``Slots`` of each query block; key_ok [B, nkb·bs].
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..common import empty
from .tiles import bias_of, merge, tile_attention, tile_attention_backward, visible


@dataclasses.dataclass(frozen=True)
class Group:
    """Selected key blocks of each query block, S' slots: idx [B, nqb, S'] (clamped to >= 0), ok [B, nqb, S']
    (False: unused slot), token_mask [B, nqb·qbs, S'] or None (which queries see the slot); ``whole``: every
    query of the block sees every key of its blocks that ``key_ok`` lets through (no causal or per-token mask)."""

    idx: torch.Tensor
    ok: torch.Tensor
    token_mask: torch.Tensor | None
    whole: bool


def split_slots(kv_blocks, token_mask, q_block_size: int, block_size: int, causal: bool) -> list[Group]:
    """kv_blocks [B, nqb, S] (-1 = unused), token_mask [B, nqb·qbs, S] or None -> the groups with slots: blocks
    seen whole by every query of their block (under a causal mask: those before it; none under a per-token
    mask), then the others (the diagonal). Under a causal mask, blocks after a query block's last query are
    dropped (no query of the block sees them)."""
    qbs, bs = q_block_size, block_size
    ok = kv_blocks >= 0
    first = torch.arange(kv_blocks.shape[1], device=kv_blocks.device)[:, None] * qbs  # [nqb, 1] first query
    if causal:
        ok &= kv_blocks * bs <= first + qbs - 1
    whole = ok & ((kv_blocks + 1) * bs <= first + 1) if causal else ok
    if token_mask is not None:
        whole = torch.zeros_like(ok)
    if kv_blocks.device.type == "meta":  # FLOP counting: no data to sort on, every slot in one group
        return [Group(kv_blocks.clamp_min(0), ok, token_mask, False)]
    groups = []
    for is_whole, keep in ((True, whole), (False, ok & ~whole)):
        idx, keep, order = _compact(kv_blocks, keep)
        if idx.shape[-1]:
            tm = None if token_mask is None else token_mask.gather(2, order.repeat_interleave(qbs, dim=1))
            groups.append(Group(idx, keep, tm, is_whole))
    return groups


def _compact(kv_blocks, keep):
    """The kept slots of each row first, as many slots as the row that keeps most -> (idx clamped to >= 0, ok,
    order), each [B, nqb, S']."""
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    order = order[..., : int(keep.sum(-1).max()) if keep.numel() else 0]
    return kv_blocks.gather(-1, order).clamp_min(0), keep.gather(-1, order), order


def _q_tiles(x, c0: int, c1: int, qbs: int, Hkv: int) -> torch.Tensor:
    """Rows of query blocks c0..c1-1 of x [B, T, H, ...] -> [B·nc, Hkv, rep·qbs, ...] (the query heads of each
    key/value head stacked along the rows)."""
    B, _, H, *rest = x.shape
    x = x[:, c0 * qbs : c1 * qbs].reshape(B, c1 - c0, qbs, Hkv, H // Hkv, *rest)
    return x.transpose(2, 3).transpose(3, 4).reshape(B * (c1 - c0), Hkv, H // Hkv * qbs, *rest)


def _from_q_tiles(t, B: int, qbs: int) -> torch.Tensor:
    """Inverse of ``_q_tiles``: [B·nc, Hkv, rep·qbs, hd] -> [B, nc·qbs, H, hd]."""
    n, Hkv, L, hd = t.shape
    return t.view(B, n // B, Hkv, L // qbs, qbs, hd).permute(0, 1, 4, 2, 3, 5).reshape(B, -1, Hkv * L // qbs, hd)


def _gather(x, idx) -> torch.Tensor:
    """Key blocks x [B, nkb, bs, Hkv, hd] at idx [B, nc, S'] -> [B·nc, Hkv, S'·bs, hd] (a transposed copy)."""
    B, nkb, bs, Hkv, hd = x.shape
    nc, S = idx.shape[1:]
    flat = (idx + torch.arange(B, device=x.device)[:, None, None] * nkb).flatten()
    g = x.view(B * nkb, bs * Hkv * hd).index_select(0, flat)  # [B·nc·S', bs·Hkv·hd]: one row per block
    return g.view(B * nc, S * bs, Hkv, hd).transpose(1, 2)


def _keys(group: Group, key_ok, causal: bool, c0: int, c1: int, qbs: int, rep: int, dtype):
    """The key tiles of query blocks c0..c1-1 in one group -> (idx [B, nc, S'], bias [B·nc, 1, rep·qbs or 1,
    S'·bs] or None, row_ok broadcastable to [B·nc, Hkv, rep·qbs] or None: which rows see a key)."""
    B, _, bs = key_ok.shape  # [B, nkb, bs]
    nc, S = c1 - c0, group.idx.shape[-1]
    idx = group.idx[:, c0:c1]
    rows = torch.arange(B, device=idx.device)[:, None, None]
    seen = (key_ok[rows, idx] & group.ok[:, c0:c1, :, None]).view(B * nc, 1, S * bs)  # [B·nc, 1, S'·bs]
    if group.token_mask is not None:
        tm = group.token_mask[:, c0 * qbs : c1 * qbs, :, None].expand(B, nc * qbs, S, bs)
        seen = seen & tm.reshape(B * nc, qbs, S * bs)
    if causal and not group.whole:
        kpos = (idx[..., None] * bs + torch.arange(bs, device=idx.device)).view(B * nc, S * bs)
        qpos = torch.arange(c0 * qbs, c1 * qbs, device=idx.device).view(nc, qbs).repeat(B, 1)
        seen = visible(seen, kpos, qpos)  # [B·nc, qbs, S'·bs]
    if seen.device.type != "meta" and bool(seen.all()):
        return idx, None, None
    row_ok = seen.any(-1)[:, None]  # [B·nc, 1, 1 or qbs]
    row_ok = row_ok if row_ok.shape[-1] == 1 else row_ok[:, :, None].expand(B * nc, 1, rep, qbs)
    return idx, bias_of(seen, dtype, rep), row_ok.reshape(B * nc, 1, -1)


class BlockSparseAttention(torch.autograd.Function):
    """q, k, v in the canonical layout, the groups of ``split_slots``, key_ok [B, nkb, bs] -> [B, nqb·qbs, H, hd]."""

    @staticmethod
    def forward(ctx, q, k, v, groups: list[Group], key_ok, causal: bool, scale: float, qbs: int):
        B, Tq, H, hd = q.shape
        nqb, (_, nkb, bs), Hkv = Tq // qbs, key_ok.shape, k.shape[2]
        kb, vb = k.view(B, nkb, bs, Hkv, hd), v.view(B, nkb, bs, Hkv, hd)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = empty(q.shape, q.dtype, q.device) if groups else torch.zeros_like(q)
        lse = torch.full((B, nqb, Hkv, H // Hkv * qbs), float("-inf"), dtype=acc, device=q.device)  # tile layout
        for i, group in enumerate(groups):
            for c0, c1 in _chunks(group, nqb, nkb * bs, bs):
                idx, bias, row_ok = _keys(group, key_ok, causal, c0, c1, qbs, H // Hkv, q.dtype)
                qt, kg, vg = _q_tiles(q, c0, c1, qbs, Hkv), _gather(kb, idx), _gather(vb, idx)
                o, lse_c = tile_attention(qt, kg, vg, bias, scale)  # [B·nc, Hkv, rep·qbs, hd], [B·nc, Hkv, rep·qbs]
                lse_c = lse_c if row_ok is None else lse_c.masked_fill(~row_ok, float("-inf"))
                if i:  # merge with the earlier groups' result
                    o, lse_c = merge(_q_tiles(out, c0, c1, qbs, Hkv), lse[:, c0:c1].flatten(0, 1), o, lse_c)
                out[:, c0 * qbs : c1 * qbs] = _from_q_tiles(o, B, qbs)
                lse[:, c0:c1] = lse_c.view(B, c1 - c0, *lse_c.shape[1:])
        lse = torch.where(torch.isfinite(lse), lse, 0.0)  # rows that see no key: any finite value
        ctx.save_for_backward(q, k, v, out, lse, key_ok)
        ctx.groups, ctx.causal, ctx.scale, ctx.qbs = groups, causal, scale, qbs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_ok = ctx.saved_tensors
        B, Tq, H, hd = q.shape
        qbs, (_, nkb, bs), Hkv = ctx.qbs, key_ok.shape, k.shape[2]
        kb, vb = k.view(B, nkb, bs, Hkv, hd), v.view(B, nkb, bs, Hkv, hd)
        dq = torch.zeros_like(q)
        dk = torch.zeros(B * nkb, bs, Hkv, hd, dtype=lse.dtype, device=k.device)
        dv = torch.zeros_like(dk)
        base = (torch.arange(B, device=q.device) * nkb)[:, None, None]
        for group in ctx.groups:
            for c0, c1 in _chunks(group, Tq // qbs, nkb * bs, bs):
                idx, bias, _ = _keys(group, key_ok, ctx.causal, c0, c1, qbs, H // Hkv, q.dtype)
                qt, ot, dot = (_q_tiles(x, c0, c1, qbs, Hkv) for x in (q, out, dout))
                kg, vg, lse_c = _gather(kb, idx), _gather(vb, idx), lse[:, c0:c1].flatten(0, 1)
                dqt, dkt, dvt = tile_attention_backward(dot, qt, kg, vg, ot, lse_c, bias, ctx.scale)
                dq[:, c0 * qbs : c1 * qbs] += _from_q_tiles(dqt, B, qbs)
                rows = (idx + base).flatten()  # [B·nc·S'] blocks of dk, dv
                dk.index_add_(0, rows, dkt.transpose(1, 2).reshape(-1, bs, Hkv, hd).to(dk.dtype))
                dv.index_add_(0, rows, dvt.transpose(1, 2).reshape(-1, bs, Hkv, hd).to(dv.dtype))
        return dq, dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype), None, None, None, None, None


def _chunks(group: Group, nqb: int, n_keys: int, bs: int) -> list[tuple[int, int]]:
    """Query blocks c0..c1-1 at a time: their gathered keys about half of the ``n_keys`` keys, their queries at
    most an eighth of the sequence (each copy a chunk makes is at most that fraction of K or q)."""
    step = max(1, min(n_keys // (2 * group.idx.shape[-1] * bs), math.ceil(nqb / 8)))
    return [(c0, min(c0 + step, nqb)) for c0 in range(0, nqb, step)]
