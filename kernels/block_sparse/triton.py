"""Block-sparse attention in Triton: FlashAttention over only the selected key tiles, forward and backward.

The selection arrives as a ``metadata.Layout`` (built once per selection, see there): for each query tile the
list of key tiles it sees (CSR) and for each key tile the list of query tiles that see it (the transposed CSR),
each entry with the bits of its selected keys and a ``full`` flag.

* forward (``fwd_kernel``, one program per query tile and head): online softmax over the tile's entries
  (Dao et al. 2022), K and V loaded in place from [B, T, Hkv, hd] (grouped-query heads index their KV head;
  nothing is repeated or gathered into a copy); the element mask (selected keys, per-query bits, causal
  diagonal) is applied only to entries that are not ``full``. Writes O and the row log-sum-exp (log2 domain).
* dk, dv (``dkdv_kernel``, one program per key tile and KV head): walks the transposed list of every query
  head of its group, recomputes P from the saved log-sum-exp and accumulates dK, dV in registers: each dK/dV
  tile is written once, by one program (deterministic, no atomics).
* dq (``dq_kernel``, one program per query tile and head): its own pass over the forward's list.

Shapes: q [B, Tq, H, hd], k/v [B, Tk, Hkv, hd], any strides with a unit last one; hd <= 256 (padded to a
power of two >= 16 on chip); fp32, fp16, bf16 with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import empty
from ..tl_util import autotune, dot, f32_dot, unit_last
from .metadata import Layout, build_layout

LOG2E = 1.4426950408889634
CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (4, 3), (8, 3), (4, 1))]
KEY = ["HD", "QT", "KT", "CAUSAL", "ROWBITS"]

__all__ = ["triton_block_sparse_attention", "build_layout"]


@triton.jit
def _visible(
    e, rows, kcols, e_bits, e_rowbits, QT: tl.constexpr, KT: tl.constexpr, CAUSAL: tl.constexpr, ROWBITS: tl.constexpr
):
    """bool [QT, KT]: which (query, key) elements of entry ``e`` are seen."""
    c = tl.arange(0, KT).to(tl.int64)
    bits = tl.load(e_bits + e)
    vis = (((bits >> c) & 1) != 0)[None, :] & (rows >= 0)[:, None]
    if ROWBITS:
        rb = tl.load(e_rowbits + e * QT + tl.arange(0, QT))
        vis = vis & (((rb[:, None] >> c[None, :]) & 1) != 0)
    if CAUSAL:
        vis = vis & (kcols[None, :] <= rows[:, None])
    return vis


@triton.jit
def _tile(ptr, b, h, idx, d, s_b, s_t, s_h, mask):
    """The [len(idx), HD] tile of a [B, T, heads, hd] tensor at batch ``b``, head ``h``, positions ``idx``."""
    return tl.load(ptr + b * s_b + h * s_h + idx[:, None] * s_t + d[None, :], mask=mask, other=0.0)


@triton.jit
def _query_tile(t, bh, H, Hs, q_start, q_end, QT: tl.constexpr):
    """Program (query tile ``t``, batch*head ``bh``) -> batch, head, selection group, rows [QT] and their mask."""
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tl.load(q_start + t) + tl.arange(0, QT)
    return b, h, b * Hs + h % Hs, rows, rows < tl.load(q_end + t)


@autotune(CONFIGS, key=KEY)
@triton.jit
def fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    q_start,
    q_end,
    row_ptr,
    e_ktile,
    e_bits,
    e_full,
    e_rowbits,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    so_b,
    so_t,
    so_h,
    H,
    Hs,
    REP,
    Tq,
    Tk,
    hd,
    n_qtiles,
    scale_log2,
    QT: tl.constexpr,
    KT: tl.constexpr,
    HD: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROWBITS: tl.constexpr,
    F32: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, g, rows, rmask = _query_tile(t, bh, H, Hs, q_start, q_end, QT)
    d = tl.arange(0, HD)
    dmask = d < hd
    qmask = rmask[:, None] & dmask[None, :]
    q = _tile(Q, b, h, rows, d, sq_b, sq_t, sq_h, qmask)
    m_i = tl.full([QT], float("-inf"), tl.float32)
    l_i = tl.zeros([QT], tl.float32)
    acc = tl.zeros([QT, HD], tl.float32)
    e0 = tl.load(row_ptr + g * n_qtiles + t)
    e1 = tl.load(row_ptr + g * n_qtiles + t + 1)
    for e in range(e0, e1):
        kcols = tl.load(e_ktile + e) * KT + tl.arange(0, KT)
        kvmask = (kcols < Tk)[:, None] & dmask[None, :]
        k = _tile(K, b, h // REP, kcols, d, sk_b, sk_t, sk_h, kvmask)
        s = dot(q, tl.trans(k), F32) * scale_log2  # [QT, KT] logits in log2 units
        if tl.load(e_full + e) == 0:
            s = tl.where(_visible(e, rows, kcols, e_bits, e_rowbits, QT, KT, CAUSAL, ROWBITS), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b, h // REP, kcols, d, sv_b, sv_t, sv_h, kvmask)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query that sees no key: zeros
    o_ptrs = Out + b * so_b + h * so_h + rows[:, None] * so_t + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=qmask)
    lse = tl.where(
        l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf")
    )  # +inf: P = 0 in the backward pass
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, lse, mask=rmask)


@autotune(CONFIGS, key=KEY)
@triton.jit
def dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    q_start,
    q_end,
    col_ptr,
    t_qtile,
    t_entry,
    e_bits,
    e_full,
    e_rowbits,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sdo_b,
    sdo_t,
    sdo_h,
    sdk_b,
    sdk_t,
    sdk_h,
    H,
    Hkv,
    Hs,
    REP,
    Tq,
    Tk,
    hd,
    n_ktiles,
    scale,
    scale_log2,
    QT: tl.constexpr,
    KT: tl.constexpr,
    HD: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROWBITS: tl.constexpr,
    F32: tl.constexpr,
):
    j = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // Hkv).to(tl.int64)
    kvh = bk % Hkv
    kcols = j * KT + tl.arange(0, KT)
    d = tl.arange(0, HD)
    dmask = d < hd
    kvmask = (kcols < Tk)[:, None] & dmask[None, :]
    k = _tile(K, b, kvh, kcols, d, sk_b, sk_t, sk_h, kvmask)
    v = _tile(V, b, kvh, kcols, d, sv_b, sv_t, sv_h, kvmask)
    dk = tl.zeros([KT, HD], tl.float32)
    dv = tl.zeros([KT, HD], tl.float32)
    for r in range(0, REP):  # the query heads that share this KV head
        h = kvh * REP + r
        g = b * Hs + h % Hs
        row_base = (b * H + h) * Tq
        p0 = tl.load(col_ptr + g * n_ktiles + j)
        p1 = tl.load(col_ptr + g * n_ktiles + j + 1)
        for i in range(p0, p1):
            t = tl.load(t_qtile + i)
            e = tl.load(t_entry + i)
            rows = tl.load(q_start + t) + tl.arange(0, QT)
            rmask = rows < tl.load(q_end + t)
            qmask = rmask[:, None] & dmask[None, :]
            q = _tile(Q, b, h, rows, d, sq_b, sq_t, sq_h, qmask)
            do = _tile(DO, b, h, rows, d, sdo_b, sdo_t, sdo_h, qmask)
            lse = tl.load(LSE + row_base + rows, mask=rmask, other=float("inf"))
            delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
            p = tl.exp2(dot(q, tl.trans(k), F32) * scale_log2 - lse[:, None])  # [QT, KT]
            if tl.load(e_full + e) == 0:
                p = tl.where(_visible(e, rows, kcols, e_bits, e_rowbits, QT, KT, CAUSAL, ROWBITS), p, 0.0)
            dv += dot(tl.trans(p.to(do.dtype)), do, F32)
            ds = p * (dot(do, tl.trans(v), F32) - delta[:, None])  # dL/d(logits)
            dk += dot(tl.trans(ds.to(q.dtype)), q, F32)
    dk_ptrs = b * sdk_b + kvh * sdk_h + kcols[:, None] * sdk_t + d[None, :]
    tl.store(DK + dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + dk_ptrs, dv.to(DV.dtype.element_ty), mask=kvmask)


@autotune(CONFIGS, key=KEY)
@triton.jit
def dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    q_start,
    q_end,
    row_ptr,
    e_ktile,
    e_bits,
    e_full,
    e_rowbits,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sdo_b,
    sdo_t,
    sdo_h,
    sdq_b,
    sdq_t,
    sdq_h,
    H,
    Hs,
    REP,
    Tq,
    Tk,
    hd,
    n_qtiles,
    scale,
    scale_log2,
    QT: tl.constexpr,
    KT: tl.constexpr,
    HD: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROWBITS: tl.constexpr,
    F32: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, g, rows, rmask = _query_tile(t, bh, H, Hs, q_start, q_end, QT)
    d = tl.arange(0, HD)
    dmask = d < hd
    qmask = rmask[:, None] & dmask[None, :]
    q = _tile(Q, b, h, rows, d, sq_b, sq_t, sq_h, qmask)
    do = _tile(DO, b, h, rows, d, sdo_b, sdo_t, sdo_h, qmask)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rmask, other=0.0)
    dq = tl.zeros([QT, HD], tl.float32)
    e0 = tl.load(row_ptr + g * n_qtiles + t)
    e1 = tl.load(row_ptr + g * n_qtiles + t + 1)
    for e in range(e0, e1):
        kcols = tl.load(e_ktile + e) * KT + tl.arange(0, KT)
        kvmask = (kcols < Tk)[:, None] & dmask[None, :]
        k = _tile(K, b, h // REP, kcols, d, sk_b, sk_t, sk_h, kvmask)
        v = _tile(V, b, h // REP, kcols, d, sv_b, sv_t, sv_h, kvmask)
        p = tl.exp2(dot(q, tl.trans(k), F32) * scale_log2 - lse[:, None])
        if tl.load(e_full + e) == 0:
            p = tl.where(_visible(e, rows, kcols, e_bits, e_rowbits, QT, KT, CAUSAL, ROWBITS), p, 0.0)
        ds = p * (dot(do, tl.trans(v), F32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, F32)
    tl.store(
        DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t + d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=qmask,
    )


def _meta(q: torch.Tensor, layout: Layout) -> dict:
    hd = q.shape[-1]
    return dict(
        QT=layout.QT,
        KT=layout.KT,
        HD=max(16, triton.next_power_of_2(hd)),
        CAUSAL=layout.causal,
        ROWBITS=layout.e_rowbits is not None,
        F32=f32_dot(q.dtype),
    )


def _rowbits(layout: Layout) -> torch.Tensor:
    return layout.e_bits if layout.e_rowbits is None else layout.e_rowbits  # a placeholder when unused


def _query_lists(layout: Layout) -> tuple:
    """The forward and dq kernels' view of the layout: per query tile its rows and its list of key-tile entries."""
    return layout.q_start, layout.q_end, layout.row_ptr, layout.e_ktile, layout.e_bits, layout.e_full, _rowbits(layout)


def _strides(*tensors: torch.Tensor) -> list[int]:
    """The batch, time and head strides of each [B, T, heads, hd] tensor, in order."""
    return [s for t in tensors for s in t.stride()[:3]]


def _forward(q, k, v, layout: Layout, scale: float):
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out = empty((B, Tq, H, hd), q.dtype, q.device)
    lse = empty((B * H, Tq), torch.float32, q.device)
    sizes = (H, layout.Hs, H // Hkv, Tq, Tk, hd, layout.n_qtiles)
    tensors = (q, k, v, out, lse, *_query_lists(layout))
    fwd_kernel[(layout.n_qtiles, B * H)](*tensors, *_strides(q, k, v, out), *sizes, scale * LOG2E, **_meta(q, layout))
    return out, lse


def _backward(q, k, v, out, lse, dout, layout: Layout, scale: float):
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).reshape(B * H, Tq).contiguous()  # rowsum(dO∘O)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    dq = empty(q.shape, q.dtype, q.device)
    meta = _meta(q, layout)
    key_lists = (layout.q_start, layout.q_end, layout.col_ptr, layout.t_qtile, layout.t_entry, layout.e_bits)
    key_lists += (layout.e_full, _rowbits(layout))
    tensors = (q, k, v, dout, lse, delta, dk, dv, *key_lists, *_strides(q, k, v, dout, dk))
    sizes = (H, Hkv, layout.Hs, H // Hkv, Tq, Tk, hd, layout.n_ktiles)
    dkdv_kernel[(layout.n_ktiles, B * Hkv)](*tensors, *sizes, scale, scale * LOG2E, **meta)
    tensors = (q, k, v, dout, lse, delta, dq, *_query_lists(layout), *_strides(q, k, v, dout, dq))
    sizes = (H, layout.Hs, H // Hkv, Tq, Tk, hd, layout.n_qtiles)
    dq_kernel[(layout.n_qtiles, B * H)](*tensors, *sizes, scale, scale * LOG2E, **meta)
    return dq, dk, dv


class BlockSparseTriton(torch.autograd.Function):
    """(q, k, v, layout, scale) -> out, with the three kernels above; the layout is reused by the backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, scale: float):
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
        out, lse = _forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, unit_last(dout), ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def triton_block_sparse_attention(
    q,
    k,
    v,
    kv_blocks,
    *,
    block_size: int,
    q_block_size: int,
    causal: bool,
    token_mask,
    key_mask,
    scale: float,
    layout: Layout | None = None,
) -> torch.Tensor:
    """Arguments as ``kernels.block_sparse.block_sparse_attention`` (checked there); ``layout``: the selection's
    metadata if already built (``build_layout``), else built here."""
    if layout is None:
        layout = build_layout(
            kv_blocks,
            q.shape[1],
            k.shape[1],
            block_size=block_size,
            q_block_size=q_block_size,
            causal=causal,
            token_mask=token_mask,
            key_mask=key_mask,
        )
    return BlockSparseTriton.apply(q, k, v, layout, scale)
