"""DuoFFN hard routing in Triton: grouped GEMMs over each module's tokens, gathered and scattered in place.

Tokens are grouped by route once per call (one stable sort: the index lists of the SMALL and the BIG tokens);
the same lists serve the backward pass. Per module (with at least one token):

* forward: ``gate_up_kernel`` (one launch over the module's tokens) reads its tokens' rows of x in place
  through the index list and computes both SwiGLU projections in one pass, h = silu(x W1ᵀ) ∘ x W3ᵀ;
  ``down_kernel`` computes h W2ᵀ and writes each result row straight to its token's row of the output, adding
  the residual there (the scatter and the residual add are its epilogue). SKIP rows get the residual (or 0).
* backward: ``gate_up_bwd_kernel`` recomputes the two projections and, with dh = dy W2 (dy gathered),
  writes dgate, dup and h; ``dx_kernel`` writes dx = dgate W1 + dup W3 to the tokens' rows; ``wgrad_kernel``
  (three launches) gives dW1 = dgateᵀ x, dW3 = dupᵀ x, dW2 = dyᵀ h, each tile reduced over the module's tokens
  inside one program (no atomics). The residual's gradient is dy itself.

The [tokens, d_ff] intermediates of a module are the only temporaries; fp32, fp16, bf16 with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import empty
from ..tl_util import autotune, dot, f32_dot
from .naive import BIG, SMALL, SwiGLUWeights

_TILES = [(64, 64, 64, 4, 2), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)]
CONFIGS = [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in _TILES]
KEY = ["D", "F"]


@triton.jit
def _load_rows(P, rows, rmask, cols, cmask, stride):
    return tl.load(P + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@autotune(CONFIGS, key=KEY)
@triton.jit
def gate_up_kernel(
    X, IDX, W1, W3, H, n_rows, D, F, sx, sw, sh, F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    """H[r, f] = silu(x[idx[r]] · W1[f]) · (x[idx[r]] · W3[f]) for a [BM, BN] tile."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < n_rows
    tok = tl.load(IDX + r, mask=rmask, other=0)
    f = tl.program_id(1) * BN + tl.arange(0, BN)
    fmask = f < F
    g = tl.zeros([BM, BN], tl.float32)
    u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        xt = _load_rows(X, tok, rmask, kk, kmask, sx)
        g += dot(xt, tl.trans(_load_rows(W1, f, fmask, kk, kmask, sw)), F32)
        u += dot(xt, tl.trans(_load_rows(W3, f, fmask, kk, kmask, sw)), F32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + r[:, None] * sh + f[None, :], h.to(H.dtype.element_ty), mask=rmask[:, None] & fmask[None, :])


@autotune(CONFIGS, key=KEY)
@triton.jit
def down_kernel(
    Hm,
    W2,
    IDX,
    RES,
    OUT,
    n_rows,
    D,
    F,
    sh,
    sw2,
    sres,
    sout,
    HAS_RES: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """OUT[idx[r], d] = RES[idx[r], d] + H[r] · W2[d] for a [BM, BN] tile (the scatter and residual fused)."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < n_rows
    tok = tl.load(IDX + r, mask=rmask, other=0)
    dcol = tl.program_id(1) * BN + tl.arange(0, BN)
    dmask = dcol < D
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, F, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < F
        acc += dot(_load_rows(Hm, r, rmask, kk, kmask, sh), tl.trans(_load_rows(W2, dcol, dmask, kk, kmask, sw2)), F32)
    if HAS_RES:
        acc += _load_rows(RES, tok, rmask, dcol, dmask, sres).to(tl.float32)
    tl.store(
        OUT + tok[:, None] * sout + dcol[None, :], acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & dmask[None, :]
    )


@autotune(CONFIGS, key=KEY)
@triton.jit
def gate_up_bwd_kernel(
    X,
    DY,
    IDX,
    W1,
    W3,
    W2,
    DG,
    DU,
    H,
    n_rows,
    D,
    F,
    sx,
    sdy,
    sw,
    sw2,
    sh,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Recompute gate g and up u of a [BM, BN] tile; with dh = dy[idx[r]] W2[:, f]: dgate, dup and h."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < n_rows
    tok = tl.load(IDX + r, mask=rmask, other=0)
    f = tl.program_id(1) * BN + tl.arange(0, BN)
    fmask = f < F
    g = tl.zeros([BM, BN], tl.float32)
    u = tl.zeros([BM, BN], tl.float32)
    dh = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        xt = _load_rows(X, tok, rmask, kk, kmask, sx)
        g += dot(xt, tl.trans(_load_rows(W1, f, fmask, kk, kmask, sw)), F32)
        u += dot(xt, tl.trans(_load_rows(W3, f, fmask, kk, kmask, sw)), F32)
        w2t = tl.load(W2 + kk[:, None] * sw2 + f[None, :], mask=kmask[:, None] & fmask[None, :], other=0.0)
        dh += dot(_load_rows(DY, tok, rmask, kk, kmask, sdy), w2t, F32)
    sig = tl.sigmoid(g)
    silu = g * sig
    out = r[:, None] * sh + f[None, :]
    omask = rmask[:, None] & fmask[None, :]
    tl.store(DG + out, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=omask)
    tl.store(DU + out, (dh * silu).to(DU.dtype.element_ty), mask=omask)
    tl.store(H + out, (silu * u).to(H.dtype.element_ty), mask=omask)


@autotune(CONFIGS, key=KEY)
@triton.jit
def dx_kernel(
    DG,
    DU,
    W1,
    W3,
    IDX,
    DX,
    n_rows,
    D,
    F,
    sh,
    sw,
    sdx,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """DX[idx[r], d] = dgate[r] · W1[:, d] + dup[r] · W3[:, d] for a [BM, BN] tile."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < n_rows
    tok = tl.load(IDX + r, mask=rmask, other=0)
    dcol = tl.program_id(1) * BN + tl.arange(0, BN)
    dmask = dcol < D
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, F, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < F
        wmask = kmask[:, None] & dmask[None, :]
        w1t = tl.load(W1 + kk[:, None] * sw + dcol[None, :], mask=wmask, other=0.0)
        w3t = tl.load(W3 + kk[:, None] * sw + dcol[None, :], mask=wmask, other=0.0)
        acc += dot(_load_rows(DG, r, rmask, kk, kmask, sh), w1t, F32)
        acc += dot(_load_rows(DU, r, rmask, kk, kmask, sh), w3t, F32)
    tl.store(DX + tok[:, None] * sdx + dcol[None, :], acc.to(DX.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@autotune(CONFIGS, key=KEY)
@triton.jit
def wgrad_kernel(
    A,
    A_IDX,
    B,
    B_IDX,
    C,
    n_rows,
    P,
    Q,
    sa,
    sb,
    sc,
    D,
    F,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """C[p, q] = Σ_r A[a(r), p] · B[b(r), q] for a [BM, BN] tile of C [P, Q]; a(r) = A_IDX[r] if A_GATHER else r."""
    p = tl.program_id(0) * BM + tl.arange(0, BM)
    pmask = p < P
    q = tl.program_id(1) * BN + tl.arange(0, BN)
    qmask = q < Q
    acc = tl.zeros([BM, BN], tl.float32)
    for r0 in range(0, n_rows, BK):
        r = r0 + tl.arange(0, BK)
        rmask = r < n_rows
        ra = tl.load(A_IDX + r, mask=rmask, other=0) if A_GATHER else r
        rb = tl.load(B_IDX + r, mask=rmask, other=0) if B_GATHER else r
        acc += dot(tl.trans(_load_rows(A, ra, rmask, p, pmask, sa)), _load_rows(B, rb, rmask, q, qmask, sb), F32)
    tl.store(C + p[:, None] * sc + q[None, :], acc.to(C.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(cols, meta["BN"]))


def _forward_module(x, idx, w: SwiGLUWeights, residual, out) -> None:
    n, (F, D) = len(idx), w.w1.shape
    f32 = f32_dot(x.dtype)
    h = empty((n, F), x.dtype, x.device)
    gate_up_kernel[_grid(n, F)](x, idx, w.w1, w.w3, h, n, D, F, x.stride(0), w.w1.stride(0), h.stride(0), F32=f32)
    res = residual if residual is not None else out
    down_kernel[_grid(n, D)](
        h,
        w.w2,
        idx,
        res,
        out,
        n,
        D,
        F,
        h.stride(0),
        w.w2.stride(0),
        res.stride(0),
        out.stride(0),
        HAS_RES=residual is not None,
        F32=f32,
    )


def _backward_module(x, dy, idx, w: SwiGLUWeights, dx):
    """Writes dx's rows of ``idx``; returns (dW1, dW3, dW2)."""
    n, (F, D) = len(idx), w.w1.shape
    f32 = f32_dot(x.dtype)
    dg, du, h = (empty((n, F), x.dtype, x.device) for _ in range(3))
    gate_up_bwd_kernel[_grid(n, F)](
        x,
        dy,
        idx,
        w.w1,
        w.w3,
        w.w2,
        dg,
        du,
        h,
        n,
        D,
        F,
        x.stride(0),
        dy.stride(0),
        w.w1.stride(0),
        w.w2.stride(0),
        h.stride(0),
        F32=f32,
    )
    dx_kernel[_grid(n, D)](dg, du, w.w1, w.w3, idx, dx, n, D, F, h.stride(0), w.w1.stride(0), dx.stride(0), F32=f32)
    grads = []
    for a, a_idx, b, b_idx, shape in (
        (dg, None, x, idx, (F, D)),
        (du, None, x, idx, (F, D)),
        (dy, idx, h, None, (D, F)),
    ):
        c = empty(shape, w.w1.dtype, x.device)
        wgrad_kernel[_grid(*shape)](
            a,
            idx if a_idx is None else a_idx,
            b,
            idx if b_idx is None else b_idx,
            c,
            n,
            *shape,
            a.stride(0),
            b.stride(0),
            c.stride(0),
            D,
            F,
            A_GATHER=a_idx is not None,
            B_GATHER=b_idx is not None,
            F32=f32,
        )
        grads.append(c)
    return grads


class RoutedFFNTriton(torch.autograd.Function):
    """(x [N, D], route [N], residual [N, D] or None, small w1, w3, w2, big w1, w3, w2) -> [N, D]."""

    @staticmethod
    def forward(ctx, x, route, residual, *weights):
        small, big = SwiGLUWeights(*weights[:3]), SwiGLUWeights(*weights[3:])
        order = route.argsort(stable=True).to(torch.int32)  # grouped by route: SKIP, SMALL, BIG
        n_skip, n_small, _ = torch.bincount(route, minlength=3).tolist()
        groups = {SMALL: order[n_skip : n_skip + n_small], BIG: order[n_skip + n_small :]}
        out = empty(x.shape, x.dtype, x.device)
        skip = order[:n_skip].long()
        out[skip] = residual[skip] if residual is not None else 0  # SKIP: the residual, exactly
        for r, w in ((SMALL, small), (BIG, big)):
            if len(groups[r]):
                _forward_module(x, groups[r], w, residual, out)
        ctx.save_for_backward(x, order, *weights)
        ctx.groups, ctx.has_residual = (n_skip, n_small), residual is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, order, *weights = ctx.saved_tensors
        small, big = SwiGLUWeights(*weights[:3]), SwiGLUWeights(*weights[3:])
        n_skip, n_small = ctx.groups
        dy = dy.contiguous()
        dx = empty(x.shape, x.dtype, x.device)
        dx[order[:n_skip].long()] = 0  # SKIP tokens: the FFN output does not depend on x
        grads = []
        for idx, w in ((order[n_skip : n_skip + n_small], small), (order[n_skip + n_small :], big)):
            grads += _backward_module(x, dy, idx, w, dx) if len(idx) else [torch.zeros_like(t) for t in w]
        return dx, None, dy if ctx.has_residual else None, *grads


def triton_routed_ffn(x, route, small: SwiGLUWeights, big: SwiGLUWeights, residual):
    """Arguments as ``kernels.routed_ffn.routed_ffn`` (checked there)."""
    D = x.shape[-1]
    weights = [t.to(x.dtype).contiguous() for w in (small, big) for t in w]
    res = None if residual is None else residual.to(x.dtype).reshape(-1, D).contiguous()
    out = RoutedFFNTriton.apply(x.reshape(-1, D).contiguous(), route.reshape(-1), res, *weights)
    return out.view(x.shape)
