"""Block-sparse attention by query blocks, forward and backward, with about the memory of K and V themselves.

Each query block attends, in one tile, to the key blocks it selected: those blocks are gathered (a copy of only
the selected rows of K and V, made a few query blocks at a time so that it stays under half the size of K) and
the tile runs through ``tiles.tile_attention``, PyTorch's fused flash-attention kernel on CPU (q read in place
with one key/value head per query head, else the query heads of a group stacked as the rows of their key/value
head, never K or V repeated; the results of consecutive query blocks written straight into place). The query
blocks are first sorted into kinds by the mask their tile needs (``plan``), so that the common cases build no
mask at all:

* ``none``: no masked key and, under a causal mask, every selected key before the block's first query (the
  tiles group query blocks that selected the same number of blocks, so that no slot is left unused);
* ``own`` (causal): when the last selected blocks are the block's own keys in order (key blocks tile the query
  block) and the others come before it, the earlier blocks are a ``none`` tile and the own keys a square tile
  of their own (forward: one triangular mask; backward: the fused kernel's causal flag, no mask, no stacked
  rows), run after it and merged into it in place by log-sum-exp (``_merge_``): the fused kernel reads and adds a
  mask for every key of a tile, so the long tile is left without one;
* ``keys``: a per-key mask (unused slots, padded or ``key_mask``-ed keys), shared by the rows of a tile;
* ``full``: a per-(query, key) mask (a per-token mask, selections that fit neither pattern above).

Only the output and the row log-sum-exp are kept: the backward pass recomputes each tile
(``tiles.tile_attention_backward``) and scatter-adds dK, dV into the selected blocks, so neither pass holds the
S-fold copy of K and V (BiFormer's released code does: ~100 GB at 600×500, rayleizhu/BiFormer#21) nor a T×T score
matrix. Without gradients this is the forward pass alone.

Canonical layout (built by ``pytorch.torch_block_sparse_attention``; one selection for all heads):
q [B, nqb·qbs, H, hd]; k, v [B, nkb·bs, Hkv, hd] (contiguous); kv_blocks [B, nqb, S]; key_ok [B, nkb, bs].
"""

from __future__ import annotations

import dataclasses

import torch

from .tiles import NEG_INF, bias_of, causal_bias, tile_attention, tile_attention_backward, visible


@dataclasses.dataclass(frozen=True)
class Rows:
    """Query blocks that share a kind of mask (see the module docstring): ``rows`` [n] indices into the B·nqb
    query blocks (ascending), ``blocks`` [n, S'] their key blocks (each row's used slots first, in key order; 0 in
    unused slots), ``used`` [n, S'] which slots are used, ``token_mask`` [n, qbs, S'] in the same slot order
    (kind ``full`` under a per-token mask, else None), ``flat`` [n, S'] the blocks as indices into the B·nkb key
    blocks of all batches."""

    kind: str
    rows: torch.Tensor
    blocks: torch.Tensor
    used: torch.Tensor
    token_mask: torch.Tensor | None
    flat: torch.Tensor


def plan(kv_blocks, token_mask, key_ok, qbs: int, causal: bool, aligned: bool, key_holes: bool) -> list[Rows]:
    """kv_blocks [B, nqb, S] (-1 = unused), token_mask [B, nqb·qbs, S] or None, key_ok [B, nkb, bs] -> the query
    blocks of each kind, ``own`` last (a query block that selects nothing is in none: it outputs zeros; one whose
    own keys are split off is in a ``none`` part for its earlier blocks, if any, and in the ``own`` part). Under a
    causal mask, key blocks that start after a block's last query are dropped. ``aligned``: causal, as many
    queries as keys and query blocks made of whole key blocks (``own`` tiles need it; padding keys past the end
    are then seen by padding queries only). ``key_holes``: some real key is masked out (``key_mask``)."""
    B, nqb, S = kv_blocks.shape
    nkb, bs = key_ok.shape[1:]
    first = torch.arange(nqb, device=kv_blocks.device)[:, None] * qbs  # [nqb, 1] first query of each block

    def rows_of(kind, rows, blocks, used, token_mask):
        return Rows(kind, rows, blocks, used, token_mask, blocks + (rows // nqb)[:, None] * nkb)

    used = kv_blocks >= 0
    if causal:
        used &= kv_blocks * bs <= first + qbs - 1
    if kv_blocks.device.type == "meta":  # FLOP counting: no data to sort on, every slot of every block
        tm = None if token_mask is None else token_mask.reshape(B * nqb, qbs, S)
        rows = torch.arange(B * nqb, device=kv_blocks.device)
        blocks = kv_blocks.reshape(B * nqb, S).clamp_min(0)
        return [rows_of("full", rows, blocks, used.reshape(B * nqb, S), tm)]
    order = torch.sort(torch.where(used, kv_blocks, nkb), dim=-1, stable=True).indices  # used first, key order
    blocks, used = kv_blocks.gather(-1, order).clamp_min(0), used.gather(-1, order)
    count = used.sum(-1)  # [B, nqb] used slots (the first ones)
    if token_mask is not None:
        kind = torch.full((B, nqb), 3, device=used.device)
    else:
        whole = torch.ones_like(count, dtype=torch.bool)  # no masked key in a used slot
        if key_holes or not aligned:
            holes = ~key_ok.all(-1)  # [B, nkb]
            whole = ~(holes.gather(1, blocks.flatten(1)).view(B, nqb, S) & used).any(-1)
        if not causal:
            kind = torch.where(whole, 0, 2)
        else:
            before = ((blocks + 1) * bs <= first + 1) | ~used  # [B, nqb, S] the slot's keys before the first query
            kind = torch.where(whole & before.all(-1), 0, 3)
            m = qbs // bs
            if aligned:  # the last m used slots: the block's own key blocks, in order; the others before
                tail = (count[..., None] - m + torch.arange(m, device=used.device)).clamp_min(0)  # [B, nqb, m]
                own = first // bs + torch.arange(m, device=first.device)  # [nqb, m]
                slot = torch.arange(S, device=used.device)
                has_own = (blocks.gather(-1, tail) == own).all(-1) & (count >= m)
                has_own &= (before | (slot >= count[..., None] - m)).all(-1)
                kind = torch.where(whole & has_own & (kind == 3), 1, kind)
    kind = torch.where(count > 0, kind, -1).flatten()  # -1: selects nothing
    blocks, used, count = blocks.flatten(0, 1), used.flatten(0, 1), count.flatten()
    if token_mask is not None:
        token_mask = token_mask.view(B, nqb, qbs, S).gather(3, order[:, :, None].expand(B, nqb, qbs, S))
        token_mask = token_mask.flatten(0, 1)
    has_own = kind == 1
    earlier = torch.where(has_own, count - qbs // bs, count)  # used slots before the block's own keys
    out = []
    for c in earlier[(kind == 0) | has_own].unique().tolist():  # every slot of a tile used: one part per count
        if c:
            rows = (((kind == 0) | has_own) & (earlier == c)).nonzero().flatten()
            out.append(rows_of("none", rows, blocks[rows, :c], used[rows, :c], None))
    for k, name in ((2, "keys"), (3, "full")):
        if (kind == k).any():
            rows = (kind == k).nonzero().flatten()
            tm = None if token_mask is None else token_mask[rows]
            out.append(rows_of(name, rows, blocks[rows], used[rows], tm))
    if has_own.any():  # last: merged with the results of the same rows' earlier slots
        rows, m = has_own.nonzero().flatten(), qbs // bs
        own = (rows % nqb)[:, None] * m + torch.arange(m, device=rows.device)  # [n, m] the block's own key blocks
        out.append(rows_of("own", rows, own, torch.ones_like(own, dtype=torch.bool), None))
    return out


@dataclasses.dataclass(frozen=True)
class TileBound:
    """How many query blocks a tile holds: its gathered keys at most half of the ``n_keys`` keys of K (the
    backward pass holds four such copies: K, V and their gradients) and each of its query-side tensors (q, the
    output, their gradients: ``q_keys`` = qbs·H / Hkv keys' worth per query block) at most a quarter."""

    n_keys: int
    bs: int
    q_keys: int

    def rows(self, part: Rows) -> int:
        """The most query blocks in one of ``part``'s tiles."""
        by_keys = self.n_keys // (2 * part.blocks.shape[1] * self.bs)
        return min(len(part.rows), max(1, min(by_keys, self.n_keys // (4 * self.q_keys))))


def tiles_of(part: Rows, bound: TileBound):
    """Tiles of a few query blocks each (``bound``), their slots trimmed to the most any of their blocks uses ->
    (rows [n], the slice they cover when consecutive (else None), blocks [n, S'], used [n, S'], token_mask
    [n, qbs, S'] or None, flat [n·S'] the blocks' indices into all batches' key blocks)."""
    step = bound.rows(part)
    for r0 in range(0, len(part.rows), step):
        sl = slice(r0, r0 + step)
        rows, blocks, used, flat = part.rows[sl], part.blocks[sl], part.used[sl], part.flat[sl]
        tm = None if part.token_mask is None else part.token_mask[sl]
        if part.kind in ("keys", "full") and rows.device.type != "meta":
            s = int(used.sum(-1).max())
            blocks, used, flat, tm = blocks[:, :s], used[:, :s], flat[:, :s], None if tm is None else tm[..., :s]
        yield rows, _run(rows), blocks, used, tm, flat.flatten()


def tile_mask(kind: str, rows, blocks, used, token_mask, key_ok, qbs: int, nqb: int, causal: bool, dtype):
    """The additive mask of one tile, broadcastable to [n, H, qbs, S'·bs], or None (kinds ``none`` and ``own``)."""
    n, S = blocks.shape
    nkb, bs = key_ok.shape[1:]
    dev = blocks.device
    if kind in ("none", "own"):  # own: the forward's ``causal_bias``, the backward's causal flag
        return None
    batch = rows // nqb
    seen = (key_ok[batch[:, None], blocks] & used[..., None]).view(n, 1, S * bs)  # [n, 1, S'·bs]
    if kind == "keys":
        return bias_of(seen, dtype)
    if token_mask is not None:
        seen = seen & token_mask.repeat_interleave(bs, -1)  # [n, qbs, S'·bs]
    if not causal:
        return bias_of(seen, dtype)
    kpos = (blocks[..., None] * bs + torch.arange(bs, device=dev)).view(n, S * bs)
    qpos = (rows % nqb)[:, None] * qbs + torch.arange(qbs, device=dev)
    return bias_of(visible(seen, kpos, qpos), dtype)


def _run(rows) -> slice | None:
    """rows [n] ascending -> the slice they cover when they are consecutive, else None."""
    if rows.device.type == "meta":
        return None
    r0, n = int(rows[0]), len(rows)
    return slice(r0, r0 + n) if int(rows[-1]) - r0 + 1 == n else None


def _take(x, rows, run):
    """x [N, ...] at rows [n] (a view when the rows are consecutive: ``run``)."""
    return x[run] if run else x.index_select(0, rows)


class Gather:
    """Copies of the key blocks of one tile at a time, x [B·nkb, bs, Hkv, hd] -> [n, Hkv, S'·bs, hd], written
    into one buffer of the largest tile (at most half of x, plus one query block's selection) that every tile of
    the pass reuses."""

    def __init__(self, x: torch.Tensor, parts: list[Rows], bound: TileBound):
        self.x = x.view(x.shape[0], -1)  # one row per block
        self.shape = x.shape[1:]
        most = max((bound.rows(p) * p.blocks.shape[1] for p in parts), default=0)
        self.buffer = self.x.new_empty(most, self.x.shape[1]) if x.device.type != "meta" else None

    def __call__(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """flat [n·S'] block indices -> [n, Hkv, S'·bs, hd]."""
        bs, Hkv, hd = self.shape
        if self.buffer is None:
            g = self.x.index_select(0, flat)
        else:
            g = torch.index_select(self.x, 0, flat, out=self.buffer[: len(flat)])
        return g.view(n, -1, Hkv, hd).transpose(1, 2)


def _merge_(o_a, lse_a, o_b, lse_b) -> None:
    """Softmax attention of rows over two disjoint key sets from each one's output o [n, L, H, hd] and lse
    [n, H, L] (-inf: no key), written into o_a and lse_a: o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b),
    i.e. o_a + w (o_b - o_a) with w = e^(lse_b - lse), lse = log(e^lse_a + e^lse_b)."""
    lse = torch.logaddexp(lse_a, lse_b)
    w = torch.exp(lse_b - lse).transpose(1, 2)[..., None]  # [n, L, H, 1]
    if o_a.dtype == w.dtype:
        o_a.lerp_(o_b, w)
    else:  # in float32 at least
        o_a.copy_(torch.lerp(o_a.to(w.dtype), o_b.to(w.dtype), w))
    lse_a.copy_(lse)


class BlockSparseAttention(torch.autograd.Function):
    """q [B, nqb·qbs, H, hd], k, v [B, nkb·bs, Hkv, hd], the ``plan``, key_ok [B, nkb, bs] -> [B, nqb·qbs, H, hd]."""

    @staticmethod
    def forward(ctx, q, k, v, parts: list[Rows], key_ok, causal: bool, scale: float, qbs: int):
        B, Tq, H, hd = q.shape
        nqb, (_, nkb, bs), Hkv = Tq // qbs, key_ok.shape, k.shape[2]
        out = torch.zeros(B * nqb, qbs, H, hd, dtype=q.dtype, device=q.device)
        lse = torch.full((B * nqb, H, qbs), NEG_INF, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
        q4, kb, vb = q.view(B * nqb, qbs, H, hd), k.view(B * nkb, bs, Hkv, hd), v.view(B * nkb, bs, Hkv, hd)
        bound = TileBound(B * nkb * bs, bs, qbs * H // Hkv)
        gather_k, gather_v = Gather(kb, parts, bound), Gather(vb, parts, bound)
        for part in parts:
            own = part.kind == "own"  # the rows' earlier slots ran first: merge the two softmaxes by their lse
            for rows, run, blocks, used, tm, flat in tiles_of(part, bound):
                mask = tile_mask(part.kind, rows, blocks, used, tm, key_ok, qbs, nqb, causal, q.dtype)
                qt, kg, vg = _take(q4, rows, run).transpose(1, 2), gather_k(flat, len(rows)), gather_v(flat, len(rows))
                o_a, lse_a = _take(out, rows, run), _take(lse, rows, run)  # views if the rows are consecutive
                if own:  # the triangle as a mask: the kernel's causal flag rounds the logits of SmolLM2 past 1e-4
                    tri = causal_bias(qbs, q.dtype, q.device).expand(len(rows), -1, -1, -1)
                    o, lse_t = tile_attention(qt, kg, vg, tri, scale)  # [n, H, qbs, hd], [n, H, qbs]
                    _merge_(o_a, lse_a, o.transpose(1, 2), lse_t)
                else:
                    tile_attention(qt, kg, vg, mask, scale, out=(o_a.transpose(1, 2), lse_a))
                if not run:  # copies: put them back
                    out.index_copy_(0, rows, o_a)
                    lse.index_copy_(0, rows, lse_a)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)  # a row that sees no key: any finite value
        out = out.view(B, Tq, H, hd)
        ctx.save_for_backward(q, k, v, out, lse, key_ok)
        ctx.parts, ctx.causal, ctx.scale, ctx.qbs = parts, causal, scale, qbs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_ok = ctx.saved_tensors
        B, Tq, H, hd = q.shape
        qbs, (_, nkb, bs), Hkv = ctx.qbs, key_ok.shape, k.shape[2]
        nqb = Tq // qbs
        q4, o4, do4 = (x.reshape(B * nqb, qbs, H, hd) for x in (q, out, dout))
        kb, vb = k.view(B * nkb, bs, Hkv, hd), v.view(B * nkb, bs, Hkv, hd)
        dq = torch.zeros(q4.shape, dtype=lse.dtype, device=q.device)  # own tiles add to their rows' earlier slots
        dk = torch.zeros(B * nkb, bs, Hkv, hd, dtype=lse.dtype, device=k.device)
        dv = torch.zeros_like(dk)
        bound = TileBound(B * nkb * bs, bs, qbs * H // Hkv)
        gather_k, gather_v = Gather(kb, ctx.parts, bound), Gather(vb, ctx.parts, bound)
        for part in ctx.parts:
            own = part.kind == "own"  # adds to the dq of the rows' earlier slots, which ran first
            for rows, run, blocks, used, tm, flat in tiles_of(part, bound):
                mask = tile_mask(part.kind, rows, blocks, used, tm, key_ok, qbs, nqb, ctx.causal, q.dtype)
                dqt, dkt, dvt = tile_attention_backward(
                    *(_take(x, rows, run).transpose(1, 2) for x in (do4, q4)),
                    gather_k(flat, len(rows)),
                    gather_v(flat, len(rows)),
                    _take(o4, rows, run).transpose(1, 2),
                    _take(lse, rows, run),
                    mask,
                    ctx.scale,
                    causal=own,
                    dq_out=dq[run].transpose(1, 2) if run and not own else None,
                )
                if own:
                    dq.index_add_(0, rows, dqt.transpose(1, 2).to(dq.dtype))
                elif not run:
                    dq.index_copy_(0, rows, dqt.transpose(1, 2).to(dq.dtype))
                n, S = blocks.shape
                dk.index_add_(0, flat, dkt.transpose(1, 2).reshape(n * S, bs, Hkv, hd).to(dk.dtype))
                dv.index_add_(0, flat, dvt.transpose(1, 2).reshape(n * S, bs, Hkv, hd).to(dv.dtype))
        return (
            dq.view(q.shape).to(q.dtype),
            dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )
