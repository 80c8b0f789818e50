"""Selection metadata for the Triton kernels: a block selection as lists of (query tile, key tile) pairs.

The kernels work on tiles, not on the selector's blocks: a *query tile* of ``QT`` queries (``QT >= 16``, the
smallest ``tl.dot``) and a *key tile* of ``KT`` consecutive keys (default 64). Each (query tile, key tile) pair
that holds at least one visible (query, key) element is one *entry*, carrying

* ``bits``: an int64 whose bit ``c`` says that key ``kt·KT + c`` is selected for the tile (slot not -1, inside
  ``Tk``, not masked by ``key_mask``, under ``causal`` not after the tile's last query);
* ``rowbits`` [QT] (only when the selection differs between a tile's queries: a ``token_mask``, or query blocks
  smaller than 16 whose tiles span several blocks): the same bits per query (causal: keys up to the query);
* ``full``: every element of the pair is visible (all bits set, no row differs, and under ``causal`` the tile
  lies wholly at or before the tile's first query), so the kernel skips the element mask.

This representation reads K and V as contiguous tiles whatever the selector's block size (1-key slots of DHSA,
4-token regions of 2-D BRA, 64-key regions of causal BRA), and masks only partial tiles. Entries are listed
twice: by query tile (``row_ptr``, CSR, for the forward and the dq pass) and by key tile (``col_ptr``, the
transposed CSR, for the dk/dv pass). Everything is built from the selection with sorts and scatters (no dense
[Tq, Tk] mask is scanned), once per selection, and can be timed apart from the kernels.

Query tiles: with query blocks of at least 16 queries, each block is cut into tiles of ``QT = min(64,
next power of two >= q_block_size)`` queries (the last tile of a block may be shorter); with smaller blocks
(``q_block_size = 1``: per-query selections) a tile is 16 consecutive queries and its entries are the union of
its queries' selections, masked per query by ``rowbits``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The metadata of one selection (G = B·Hs selections; E entries). Integer tensors on the selection's device."""

    QT: int  # queries per query tile
    KT: int  # keys per key tile
    Hs: int  # selections per batch element (1 or H)
    n_qtiles: int
    n_ktiles: int
    causal: bool
    q_start: torch.Tensor  # int32 [n_qtiles]: first query of each tile
    q_end: torch.Tensor  # int32 [n_qtiles]: one past its last query
    row_ptr: torch.Tensor  # int32 [G·n_qtiles + 1]: entries of query tile t of selection g
    e_ktile: torch.Tensor  # int32 [E]: key tile of each entry
    e_bits: torch.Tensor  # int64 [E]: selected keys of the key tile
    e_full: torch.Tensor  # int8 [E]: 1 = no element of the pair is masked
    e_rowbits: torch.Tensor | None  # int64 [E, QT]: selected keys per query of the tile
    col_ptr: torch.Tensor  # int32 [G·n_ktiles + 1]: entries of key tile j of selection g (transposed)
    t_qtile: torch.Tensor  # int32 [E]: query tile of each transposed entry
    t_entry: torch.Tensor  # int32 [E]: its index among the entries

    @property
    def n_entries(self) -> int:
        return self.e_ktile.numel()


def _low_bits(n: torch.Tensor) -> torch.Tensor:
    """int64 with bits 0..n-1 set, for n in [0, 64] (no signed overflow on the way)."""
    low = (torch.ones_like(n) << n.clamp(max=62)) - 1
    low = torch.where(n == 63, INT64_MAX, low)
    return torch.where(n >= 64, -1, low)


def _range_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 with bits a..b-1 set (0 <= a, b <= 64; 0 where b <= a)."""
    return torch.where(b > a, _low_bits(b) - _low_bits(a), 0)


def _pack_bits(ok: torch.Tensor) -> torch.Tensor:
    """bool [..., KT] -> int64 [...]: bit c = ok[..., c] (KT <= 64)."""
    KT = ok.shape[-1]
    pow2 = torch.tensor([1 << c for c in range(63)] + [INT64_MIN], device=ok.device)[:KT]
    return (ok.long() * pow2).sum(-1)  # distinct powers of two: the sum never overflows


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def query_tiles(Tq: int, q_block_size: int) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
    """(QT, q_start, q_end, spans): the query tiles; ``spans`` = a tile may hold queries of several blocks."""
    qbs = q_block_size
    if qbs >= 16:
        QT = min(64, next_pow2(qbs))
        nsub, nqb = math.ceil(qbs / QT), math.ceil(Tq / qbs)
        blk = torch.arange(nqb).repeat_interleave(nsub)
        sub = torch.arange(nsub).repeat(nqb)
        start = blk * qbs + sub * QT
        end = (blk * qbs + ((sub + 1) * QT).clamp_max(qbs)).clamp_max(Tq)
        keep = start < Tq
        return QT, start[keep], end[keep], False
    QT = 16
    start = torch.arange(math.ceil(Tq / QT)) * QT
    return QT, start, (start + QT).clamp_max(Tq), True


def build_layout(
    kv_blocks: torch.Tensor,
    Tq: int,
    Tk: int,
    *,
    block_size: int,
    q_block_size: int,
    causal: bool,
    token_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    key_tile: int = 64,
) -> Layout:
    """The ``Layout`` of a selection (arguments as ``kernels.block_sparse.block_sparse_attention``, checked
    there). ``key_tile``: KT, a power of two in [16, 64]."""
    if key_tile not in (16, 32, 64):
        raise ValueError(f"key_tile: {key_tile} must be 16, 32 or 64")
    kv_blocks = kv_blocks.long()
    B, Hs, nqb, S = kv_blocks.shape
    dev, KT = kv_blocks.device, key_tile
    nkt = math.ceil(Tk / KT)
    QT, q_start, q_end, spans = query_tiles(Tq, q_block_size)
    q_start, q_end = q_start.to(dev), q_end.to(dev)
    nt = len(q_start)
    key_ok = torch.arange(nkt * KT, device=dev) < Tk  # [nkt·KT]: the ragged tail
    if key_mask is not None:
        key_ok = key_ok & torch.nn.functional.pad(key_mask, (0, nkt * KT - Tk))  # [B, nkt·KT]
    key_bits = _pack_bits(key_ok.expand(B, -1).reshape(B, nkt, KT))  # [B, nkt]

    # every (query row, slot, piece): the query tile, the key tile and the bits of that slot's block in it
    rows = q_start[:, None] + torch.arange(QT, device=dev)  # [nt, QT]
    row_ok = rows < q_end[:, None]
    rows = rows.clamp_max(Tq - 1)
    per_row = spans or token_mask is not None
    if per_row:
        sel = kv_blocks[:, :, rows // q_block_size]  # [B, Hs, nt, QT, S]
    else:  # one block per tile: its first row stands for all
        sel = kv_blocks[:, :, rows[:, 0] // q_block_size, None]  # [B, Hs, nt, 1, S]
    kt, bits, ok = _pieces(sel, block_size, KT, Tk, nkt)  # [B, Hs, nt, R, S, m]
    bits = bits & key_bits[torch.arange(B, device=dev).view(B, 1, 1, 1, 1, 1), kt]
    ok = ok & (bits != 0) & (row_ok if per_row else row_ok[:, :1])[..., None, None]
    if token_mask is not None:
        ok = ok & token_mask[:, :, rows][..., None]  # [B, Hs, nt, QT, S, 1]
    if causal:  # a key tile after the tile's last query is never seen
        ok = ok & (kt * KT < q_end.view(nt, 1, 1, 1))
    g_t = torch.arange(B * Hs, device=dev).view(B, Hs, 1, 1, 1, 1) * nt + torch.arange(nt, device=dev).view(nt, 1, 1, 1)
    key = (g_t * nkt + kt)[ok]  # flat (selection, query tile, key tile) of every piece
    uniq, inv = torch.unique(key, return_inverse=True)
    E, R = len(uniq), sel.shape[3]
    r = torch.arange(R, device=dev).view(R, 1, 1).expand(ok.shape)[ok]
    rowbits = torch.zeros(E * R, dtype=torch.long, device=dev).index_add_(0, inv * R + r, bits[ok]).view(E, R)
    e_ktile, gt = uniq % nkt, uniq // nkt  # [E]
    t = gt % nt
    first = q_start[t, None] + torch.arange(R, device=dev)  # [E, R] the query of each row (R = 1: the first)
    if causal:  # keys after a row's query (per_row), or after the tile's last query, are never seen
        last = first if per_row else q_end[t, None] - 1
        rowbits &= _low_bits((last - e_ktile[:, None] * KT + 1).clamp(0, KT))
    e_bits = functools.reduce(torch.bitwise_or, rowbits.unbind(1))
    keep = e_bits != 0  # entries whose visible keys all lie after the tile's queries
    rowbits, e_bits, e_ktile, gt, t, first = rowbits[keep], e_bits[keep], e_ktile[keep], gt[keep], t[keep], first[keep]
    all_keys = _low_bits(torch.tensor(KT))
    full = e_bits == all_keys
    if per_row:  # rows past the tile's end do not count
        full &= ((rowbits == all_keys) | (first >= q_end[t, None])).all(1)
    if causal:
        full &= e_ktile * KT + KT - 1 <= q_start[t]
    G = B * Hs
    row_ptr = _ptr(gt, G * nt)
    tkey = ((gt // nt) * nkt + e_ktile) * nt + t
    order = torch.argsort(tkey)
    col_ptr = _ptr((gt // nt * nkt + e_ktile)[order], G * nkt)
    i32 = torch.int32
    return Layout(
        QT=QT,
        KT=KT,
        Hs=Hs,
        n_qtiles=nt,
        n_ktiles=nkt,
        causal=causal,
        q_start=q_start.to(i32),
        q_end=q_end.to(i32),
        row_ptr=row_ptr,
        e_ktile=e_ktile.to(i32),
        e_bits=e_bits,
        e_full=full.to(torch.int8),
        e_rowbits=rowbits.contiguous() if per_row else None,
        col_ptr=col_ptr,
        t_qtile=t[order].to(i32),
        t_entry=order.to(i32),
    )


def _pieces(sel: torch.Tensor, bs: int, KT: int, Tk: int, nkt: int):
    """Key tiles touched by each selected block: sel [...] block index (-1 = unused) -> kt, bits, ok [..., m]."""
    m = (bs + KT - 2) // KT + 1  # most key tiles a run of bs keys can touch
    lo = sel.clamp_min(0) * bs
    hi = (lo + bs).clamp_max(Tk)
    kt = (lo // KT)[..., None] + torch.arange(m, device=sel.device)  # [..., m]
    a = (lo[..., None] - kt * KT).clamp(0, KT)
    b = (hi[..., None] - kt * KT).clamp(0, KT)
    ok = (sel >= 0)[..., None] & (b > a)
    return kt.clamp_max(nkt - 1), _range_bits(a, b), ok


def _ptr(groups: torch.Tensor, n: int) -> torch.Tensor:
    """CSR offsets: int32 [n + 1] for sorted group ids [E]."""
    counts = torch.bincount(groups, minlength=n)
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
