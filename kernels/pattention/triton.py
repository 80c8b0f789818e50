"""Fused Pattention (TokenFormer Eq. 5, and its L1 variant) in Triton: the [tokens × n] scores never reach memory.

With A = X Kᵀ, r = ‖A‖ per row (L2, or L1 with ``L1``), u = τ·A/r, S = GeLU(u), out = S V:

* forward: ``norm_kernel`` (pass 1) computes r per row tile, looping over the n parameter tokens in tiles;
  ``out_kernel`` (pass 2) recomputes each A tile, normalises it, applies GeLU and accumulates S V on chip.
* backward (nothing but x, K, V and r were saved; A and S are recomputed tile by tile): with dS = dO Vᵀ,
  du = dS ∘ GeLU'(u) and c = Σ_j du_j A_j per row (``c_kernel``, a pass over the n tokens per row tile),
  dA = τ/r · (du − A·c/r²) (L2) or τ/r · (du − sign(A)·c/r) (L1), written with S by ``da_kernel`` (one
  program per tile, no atomics); then three plain GEMMs: dx = dA K, dK = dAᵀ X, dV = Sᵀ dO; dτ = Σ_i c_i / r_i.
  dA and S are the backward's transients ([tokens × n] each, like the activations a GELU MLP keeps).

Cost: the forward recomputes A once per output-column tile (``BC`` columns of d_out), so it does
(1 + ⌈d_out / BC⌉) products x Kᵀ and one S V: the price of never writing S, which grows with d_out / BC.

n is a runtime argument: growing the parameter tokens needs no code change. Rows of x, K, V are read with their
strides (unit last stride); fp32, fp16, bf16 with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import empty
from ..tl_util import autotune, dot, f32_dot, unit_last
from .naive import NORM_EPS

EPS = tl.constexpr(NORM_EPS)  # a jit function may read a global only as a constexpr

# (BM, BN, BK, BC, warps, stages): wide output tiles (BC) mean fewer recomputations of A in the forward
_TILES = [(64, 64, 64, 64, 4, 2), (64, 64, 64, 256, 8, 3), (64, 128, 64, 128, 8, 3), (128, 64, 64, 128, 8, 3)]
CONFIGS = [
    triton.Config({"BM": m, "BN": n, "BK": k, "BC": c}, num_warps=w, num_stages=s) for m, n, k, c, w, s in _TILES
]
KEY = ["d_in", "d_out", "L1"]


@triton.jit
def _rows_dot(
    A,
    B,
    rows,
    rmask,
    cols,
    cmask,
    width,
    sa,
    sb,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    F32: tl.constexpr,
):
    """A[rows, :width] @ B[cols, :width]ᵀ -> fp32 [BM, BN] (masked rows/cols give 0)."""
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, width, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < width
        a = tl.load(A + rows[:, None] * sa + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * sb + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc += dot(a, tl.trans(b), F32)
    return acc


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u):
    return 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


@triton.jit
def _row_state(R, C, rows, rmask):
    """(r clamped to EPS, c, whether r was above EPS) of the rows."""
    r_raw = tl.load(R + rows, mask=rmask, other=1.0)
    c = tl.load(C + rows, mask=rmask, other=0.0)
    return tl.maximum(r_raw, EPS), c, r_raw >= EPS


@triton.jit
def _dscores(a, ds, r, c, live, tau, L1: tl.constexpr):
    """dL/dA of a tile from dL/dS (``ds``) and the row state."""
    u = tau * a / r[:, None]
    du = ds * _gelu_grad(u)
    if L1:
        corr = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)) * (c / r)[:, None]
    else:
        corr = a * (c / (r * r))[:, None]
    return (tau / r)[:, None] * (du - tl.where(live[:, None], corr, 0.0))


@autotune(CONFIGS, key=KEY)
@triton.jit
def norm_kernel(
    X,
    Kp,
    R,
    M,
    n,
    d_in,
    d_out,
    sx,
    sk,
    L1: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    acc = tl.zeros([BM], tl.float32)
    for n0 in range(0, n, BN):
        cols = n0 + tl.arange(0, BN)
        a = _rows_dot(X, Kp, rows, rmask, cols, cols < n, d_in, sx, sk, BM, BN, BK, F32)
        if L1:
            acc += tl.sum(tl.abs(a), 1)
        else:
            acc += tl.sum(a * a, 1)
    if not L1:
        acc = tl.sqrt(acc)
    tl.store(R + rows, acc, mask=rmask)


@autotune(CONFIGS, key=KEY)
@triton.jit
def out_kernel(
    X,
    Kp,
    V,
    Out,
    R,
    TAU,
    M,
    n,
    d_in,
    d_out,
    sx,
    sk,
    sv,
    so,
    L1: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    dcols = tl.program_id(1) * BC + tl.arange(0, BC)
    dmask = dcols < d_out
    r = tl.maximum(tl.load(R + rows, mask=rmask, other=1.0), EPS)
    tau = tl.load(TAU)
    acc = tl.zeros([BM, BC], tl.float32)
    for n0 in range(0, n, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < n
        s = _gelu(tau * _rows_dot(X, Kp, rows, rmask, cols, cmask, d_in, sx, sk, BM, BN, BK, F32) / r[:, None])
        v = tl.load(V + cols[:, None] * sv + dcols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += dot(s.to(v.dtype), v, F32)
    tl.store(
        Out + rows[:, None] * so + dcols[None, :], acc.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :]
    )


@autotune(CONFIGS, key=KEY)
@triton.jit
def c_kernel(
    X,
    Kp,
    V,
    DO,
    R,
    TAU,
    C,
    M,
    n,
    d_in,
    d_out,
    sx,
    sk,
    sv,
    sdo,
    L1: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    r = tl.maximum(tl.load(R + rows, mask=rmask, other=1.0), EPS)
    tau = tl.load(TAU)
    c = tl.zeros([BM], tl.float32)
    for n0 in range(0, n, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < n
        a = _rows_dot(X, Kp, rows, rmask, cols, cmask, d_in, sx, sk, BM, BN, BK, F32)
        ds = _rows_dot(DO, V, rows, rmask, cols, cmask, d_out, sdo, sv, BM, BN, BK, F32)
        c += tl.sum(ds * _gelu_grad(tau * a / r[:, None]) * a, 1)
    tl.store(C + rows, c, mask=rmask)


@autotune(CONFIGS, key=KEY)
@triton.jit
def da_kernel(
    X,
    Kp,
    V,
    DO,
    R,
    TAU,
    C,
    DA,
    S,
    M,
    n,
    d_in,
    d_out,
    sx,
    sk,
    sv,
    sdo,
    sda,
    L1: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
):
    """One [BM, BN] tile of dA and of S, recomputed from x, K, V, dO and the row state (r, c)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < n
    r, c, live = _row_state(R, C, rows, rmask)
    tau = tl.load(TAU)
    a = _rows_dot(X, Kp, rows, rmask, cols, cmask, d_in, sx, sk, BM, BN, BK, F32)
    ds = _rows_dot(DO, V, rows, rmask, cols, cmask, d_out, sdo, sv, BM, BN, BK, F32)
    out = rows[:, None] * sda + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(DA + out, _dscores(a, ds, r, c, live, tau, L1).to(DA.dtype.element_ty), mask=omask)
    tl.store(S + out, _gelu(tau * a / r[:, None]).to(S.dtype.element_ty), mask=omask)


def _grid(rows: int, cols: int, row_block: str):
    return lambda meta: (triton.cdiv(rows, meta[row_block]), triton.cdiv(cols, meta["BC"]))


class PattentionTriton(torch.autograd.Function):
    """(x [M, d_in], key [n, d_in], value [n, d_out], tau [] fp32, L1) -> [M, d_out]; one dtype for x, key, value."""

    @staticmethod
    def forward(ctx, x, key, value, tau, l1: bool):
        x, key, value = unit_last(x), unit_last(key), unit_last(value)
        (M, d_in), (n, d_out) = x.shape, value.shape
        f32 = f32_dot(x.dtype)
        r = empty((M,), torch.float32, x.device)
        norm_kernel[_grid(M, 1, "BM")](x, key, r, M, n, d_in, d_out, x.stride(0), key.stride(0), L1=l1, F32=f32)
        out = empty((M, d_out), x.dtype, x.device)
        out_kernel[_grid(M, d_out, "BM")](
            x,
            key,
            value,
            out,
            r,
            tau,
            M,
            n,
            d_in,
            d_out,
            x.stride(0),
            key.stride(0),
            value.stride(0),
            out.stride(0),
            L1=l1,
            F32=f32,
        )
        ctx.save_for_backward(x, key, value, tau, r)
        ctx.l1 = l1
        return out

    @staticmethod
    def backward(ctx, dout):
        x, key, value, tau, r = ctx.saved_tensors
        dout = unit_last(dout)
        (M, d_in), (n, d_out) = x.shape, value.shape
        args = dict(L1=ctx.l1, F32=f32_dot(x.dtype))
        strides = (x.stride(0), key.stride(0), value.stride(0), dout.stride(0))
        c = empty((M,), torch.float32, x.device)
        c_kernel[_grid(M, 1, "BM")](x, key, value, dout, r, tau, c, M, n, d_in, d_out, *strides, **args)
        da, s = empty((M, n), x.dtype, x.device), empty((M, n), x.dtype, x.device)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
        da_kernel[grid](x, key, value, dout, r, tau, c, da, s, M, n, d_in, d_out, *strides, da.stride(0), **args)
        dtau = (c / r.clamp_min(NORM_EPS)).sum() if ctx.needs_input_grad[3] else None
        return da @ key, da.t() @ x, s.t() @ dout, dtau, None


def triton_pattention(x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tau: torch.Tensor, norm: str):
    """Arguments as ``kernels.pattention.pattention`` (checked there; norm ``l2_gelu`` or ``l1_gelu``)."""
    shape = x.shape
    key, value = key.to(x.dtype), value.to(x.dtype)
    tau = torch.as_tensor(tau, dtype=torch.float32, device=x.device).reshape(())
    out = PattentionTriton.apply(x.reshape(-1, shape[-1]), key, value, tau, norm == "l1_gelu")
    return out.view(*shape[:-1], value.shape[-1])
