"""Block-sparse attention grouped by key block, for selections that differ between the queries of a block:
per-query selections (``q_block_size = 1``, 1-D causal BRA) and per-token masks much sparser than their query
block's union of blocks.

Each (query, selected key block) pair is sent to its key block: the queries that selected block b are packed into
tiles of at most ``width`` queries (``width`` = the mean number per block, so padding at most doubles the work),
which attend to block b's keys with ``tiles.tile_attention`` (all heads of a query in one tile, grouped-query
heads reading their key/value head, one block per tile). What is copied is the pairs' queries, not the keys. Pairs
whose block the query sees whole need no mask; the others (its own block under a causal mask, blocks with masked
keys) are tiled apart, with a per-(query, key) bias.

The query rows are processed in chunks; each chunk's pairs in sub-chunks of tiles, whose partial results are
merged into the chunk's running output by their log-sum-exp (online softmax, the split-KV merge of FlashDecoding),
so that memory stays a fraction of q's whatever the number of pairs. The backward pass recomputes each tile from
the final output and log-sum-exp (``tiles.tile_attention_backward``) and scatter-adds dq into the queries and dk,
dv into the blocks: between the passes, nothing per pair is kept but indices.

Layout (built by ``pytorch.torch_block_sparse_attention``; one selection for all heads): q [B, Tq, H, hd];
k, v [B, nkb·bs, Hkv, hd]; key_ok [B, nkb, bs].
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .tiles import bias_of, tile_attention, tile_attention_backward, visible

ROW_CHUNKS = 4  # query rows in this many chunks: the running output of a chunk is 1/4 of the output's size
PAIRS_PER_STEP = 1 / 8  # pairs per sub-chunk, as a fraction of the query rows: each copy of them is ~1/8 of q's


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The pairs of one chunk of query rows and one class (seen whole, or masked), in n tiles of ``width`` slots."""

    src: torch.Tensor  # [n·width] query row b·Tq + t of each slot (padding: the chunk's first row)
    valid: torch.Tensor  # [n·width] the slot holds a pair
    block: torch.Tensor  # [n] key block b·nkb + j of each tile
    width: int
    masked: bool  # needs a per-(query, key) bias

    def steps(self, pairs: int) -> list[slice]:
        """Consecutive tiles holding at most about ``pairs`` slots."""
        n, step = len(self.block), max(1, pairs // self.width)
        return [slice(t0, min(t0 + step, n)) for t0 in range(0, n, step)]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Query rows r0..r1-1 (of the B·Tq rows) and the tiles of their pairs."""

    r0: int
    r1: int
    tiles: list[Tiles]


def pair_chunks(kv_blocks, token_mask, q_block_size: int, Tq: int, key_ok, causal: bool) -> list[Chunk]:
    """The pairs of a selection, tiled: kv_blocks [B, nqb, S] (-1 = unused), token_mask [B, Tq, S] or None,
    key_ok [B, nkb, bs] -> the ``Chunk``s of query rows. Under a causal mask, a block that starts after its query
    is no pair."""
    B, nkb, bs = key_ok.shape
    t = torch.arange(Tq, device=kv_blocks.device)
    blocks = kv_blocks[:, t // q_block_size]  # [B, Tq, S]
    ok = blocks >= 0
    if token_mask is not None:
        ok &= token_mask
    if causal:
        ok &= blocks * bs <= t[:, None]
    masked = ~key_ok.all(-1).gather(1, blocks.clamp_min(0).flatten(1)).view_as(blocks)
    if causal:
        masked |= (blocks + 1) * bs > t[:, None] + 1
    b, tq, s = ok.nonzero(as_tuple=True)  # pairs, in row order
    row, group, masked = b * Tq + tq, b * nkb + blocks[b, tq, s], masked[b, tq, s]
    size = math.ceil(B * Tq / ROW_CHUNKS)
    bounds = torch.searchsorted(row, torch.arange(0, B * Tq + size, size, device=row.device)).tolist()
    chunks = []
    for c, (p0, p1) in enumerate(zip(bounds[:-1], bounds[1:])):
        r0, r1 = c * size, min((c + 1) * size, B * Tq)
        cls = [_tile(row[p0:p1][m], group[p0:p1][m], r0, is_masked) for is_masked, m in _classes(masked[p0:p1])]
        chunks.append(Chunk(r0, r1, [x for x in cls if x is not None]))
    return chunks


def _classes(masked):
    return (False, ~masked), (True, masked)


def _tile(row, group, r0: int, masked: bool) -> Tiles | None:
    """Pairs (query row, key block) -> ``Tiles``: grouped by block, each group cut into tiles of at most
    ``width`` queries (the mean group size, so padding at most doubles the work)."""
    if not len(row):
        return None
    order = torch.argsort(group, stable=True)
    row, group = row[order], group[order]
    blocks, counts = torch.unique_consecutive(group, return_counts=True)  # [G] non-empty groups
    width = -(-len(row) // len(blocks))
    first = torch.cumsum(counts, 0) - counts  # [G] first pair of each group
    rank = torch.arange(len(row), device=row.device) - torch.repeat_interleave(first, counts)  # in its group
    n_sub = -(-counts // width)  # [G] tiles per group
    tile = torch.repeat_interleave(torch.cumsum(n_sub, 0) - n_sub, counts) + rank // width
    n = int(n_sub.sum())
    src = torch.full((n * width,), r0, dtype=row.dtype, device=row.device)
    valid = torch.zeros(n * width, dtype=torch.bool, device=row.device)
    slot = tile * width + rank % width
    src[slot], valid[slot] = row, True
    return Tiles(src, valid, torch.repeat_interleave(blocks, n_sub, output_size=n), width, masked)


def _queries(x, tiles: Tiles, t: slice) -> torch.Tensor:
    """Rows of x [B·Tq, H, ...] in the slots of tiles t -> [n, H, width, ...] (a transposed copy)."""
    w = tiles.width
    rows = x.index_select(0, tiles.src[t.start * w : t.stop * w])  # [n·width, H, ...]
    return rows.view(t.stop - t.start, w, *x.shape[1:]).transpose(1, 2)


def _keys(x, tiles: Tiles, t: slice) -> torch.Tensor:
    """The key block of tiles t: x [B·nkb, bs, Hkv, hd] -> [n, Hkv, bs, hd] (a copy of those blocks)."""
    return x.index_select(0, tiles.block[t]).transpose(1, 2)


def _visibility(tiles: Tiles, t: slice, key_ok, nkb: int, causal: bool, Tq: int):
    """(bias [n, 1, width or 1, bs] in float32 of the masked tiles, or None; seen [n, width or 1, bs] or None)."""
    if not tiles.masked:
        return None
    bs = key_ok.shape[1]
    ok = key_ok.index_select(0, tiles.block[t])[:, None]  # [n, 1, bs]
    if not causal:
        return ok
    qpos = (tiles.src[t.start * tiles.width : t.stop * tiles.width] % Tq).view(-1, tiles.width)  # [n, width]
    kpos = (tiles.block[t] % nkb)[:, None] * bs + torch.arange(bs, device=ok.device)  # [n, bs]
    return visible(ok, kpos, qpos)  # [n, width, bs]


class PairAttention(torch.autograd.Function):
    """q [B, Tq, H, hd], k, v [B, nkb·bs, Hkv, hd], the ``pair_chunks`` of the selection, key_ok [B, nkb, bs]
    -> [B, Tq, H, hd]."""

    @staticmethod
    def forward(ctx, q, k, v, chunks: list[Chunk], key_ok, causal: bool, scale: float):
        B, Tq, H, hd = q.shape
        nkb, bs, Hkv = key_ok.shape[1], key_ok.shape[2], k.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        kb, vb, key_ok = k.view(B * nkb, bs, Hkv, hd), v.view(B * nkb, bs, Hkv, hd), key_ok.reshape(B * nkb, bs)
        x = q.reshape(B * Tq, H, hd)
        out = torch.empty_like(x)
        lse = torch.empty(B * Tq, H, dtype=acc, device=q.device)
        pairs = max(1, int(PAIRS_PER_STEP * B * Tq))
        for chunk in chunks:
            rows = chunk.r1 - chunk.r0
            o_acc = torch.zeros(rows, H, hd, dtype=acc, device=q.device)
            m = torch.full((rows, H), float("-inf"), dtype=acc, device=q.device)
            l = torch.zeros_like(m)  # noqa: E741
            for tiles in chunk.tiles:
                for t in tiles.steps(pairs):
                    seen = _visibility(tiles, t, key_ok, nkb, causal, Tq)
                    bias = None if seen is None else bias_of(seen, q.dtype)
                    o, lse_t = tile_attention(
                        _queries(x, tiles, t), _keys(kb, tiles, t), _keys(vb, tiles, t), bias, scale
                    )  # [n, H, width, hd], [n, H, width]
                    w = tiles.width
                    ok = tiles.valid[t.start * w : t.stop * w]  # [n·width] slots holding a pair
                    if seen is not None:  # and whose query sees a key of the block
                        ok = ok & seen.any(-1).expand(-1, w).flatten()
                    lse_t = lse_t.transpose(1, 2).reshape(-1, H).masked_fill(~ok[:, None], float("-inf"))
                    local = tiles.src[t.start * w : t.stop * w] - chunk.r0
                    o = o.transpose(1, 2).reshape(-1, H, hd)
                    _accumulate(o_acc, m, l, local, o, lse_t)
            saw = l > 0
            out[chunk.r0 : chunk.r1] = (o_acc / torch.where(saw, l, 1.0)[..., None]).to(q.dtype)
            lse[chunk.r0 : chunk.r1] = torch.where(saw, m + torch.log(l), 0.0)
        out = out.view(B, Tq, H, hd)
        ctx.save_for_backward(q, k, v, out, lse, key_ok)
        ctx.chunks, ctx.causal, ctx.scale, ctx.pairs = chunks, causal, scale, pairs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_ok = ctx.saved_tensors
        B, Tq, H, hd = q.shape
        nkb, bs, Hkv = key_ok.shape[0] // B, key_ok.shape[1], k.shape[2]
        kb, vb = k.view(B * nkb, bs, Hkv, hd), v.view(B * nkb, bs, Hkv, hd)
        x, o, do = (t.reshape(B * Tq, H, hd) for t in (q, out, dout))
        dq = torch.zeros(B * Tq, H, hd, dtype=lse.dtype, device=q.device)
        dk = torch.zeros(B * nkb, bs, Hkv, hd, dtype=lse.dtype, device=q.device)
        dv = torch.zeros_like(dk)
        for chunk in ctx.chunks:
            for tiles in chunk.tiles:
                for t in tiles.steps(ctx.pairs):
                    seen = _visibility(tiles, t, key_ok, nkb, ctx.causal, Tq)
                    bias = None if seen is None else bias_of(seen, q.dtype)
                    w = tiles.width
                    pad = ~tiles.valid[t.start * w : t.stop * w].view(-1, 1, w, 1)  # [n, 1, width, 1]
                    dot = _queries(do, tiles, t).masked_fill_(pad, 0.0)  # padding slots pass no gradient
                    dqt, dkt, dvt = tile_attention_backward(
                        dot,
                        _queries(x, tiles, t),
                        _keys(kb, tiles, t),
                        _keys(vb, tiles, t),
                        _queries(o, tiles, t),
                        _queries(lse, tiles, t),
                        bias,
                        ctx.scale,
                    )  # [n, H, width, hd], [n, Hkv, bs, hd] x 2
                    src = tiles.src[t.start * w : t.stop * w]
                    dq.index_add_(0, src, dqt.transpose(1, 2).flatten(0, 1).to(dq.dtype))
                    dk.index_add_(0, tiles.block[t], dkt.transpose(1, 2).to(dk.dtype))
                    dv.index_add_(0, tiles.block[t], dvt.transpose(1, 2).to(dv.dtype))
        grads = dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)
        return (*grads, None, None, None, None)


def _accumulate(o_acc, m, l, row, o, lse) -> None:  # noqa: E741
    """Online softmax merge, in place: the running output o_acc [R, H, hd] (not yet divided by l), its row maxima
    m and sums l [R, H] take the partial results o [P, H, hd], lse [P, H] (-inf: no pair) of rows ``row`` [P];
    only the rows they touch are read and rescaled."""
    u, inv = torch.unique(row, return_inverse=True)
    m_u = m[u]
    m_new = m_u.scatter_reduce(0, inv[:, None].expand_as(lse), lse, "amax")
    ref = torch.where(torch.isfinite(m_new), m_new, 0.0)
    rescale, w = torch.exp(m_u - ref), torch.exp(lse - ref[inv])  # [U, H], [P, H]
    o_acc[u] = (o_acc[u] * rescale[..., None]).index_add_(0, inv, w[..., None] * o.to(o_acc.dtype))
    l[u] = (l[u] * rescale).index_add_(0, inv, w)
    m[u] = m_new
