"""pattention: the fused Triton kernels against the definition (outputs and dx, dK, dV, dτ), every norm of the
definition against a row-by-row transcription of its formula, growth exactness through the kernels."""

import math

import pytest
import torch

from kernels.common import poisoned_outputs
from kernels.pattention import pattention
from kernels.pattention.naive import default_tau

from .conftest import DEVICE, check


def by_formula(x, K, V, tau, norm):
    """Row by row, straight from the formulas (paper Eq. 5; the released code's softmax; the L1 analogue)."""
    rows = []
    for xi in x.reshape(-1, x.shape[-1]):
        a = (K * xi).sum(-1)  # [n]
        if norm == "softmax":
            s = tau * torch.exp(a) / torch.exp(a).sum()
        else:
            r = torch.sqrt((a * a).sum()) if norm == "l2_gelu" else a.abs().sum()
            z = tau * a / r
            s = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GeLU
        rows.append((s[:, None] * V).sum(0))
    return torch.stack(rows).reshape(*x.shape[:-1], V.shape[-1])


def inputs(shape, d_in, d_out, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g).to(DEVICE, dtype)
    K = (torch.randn(n, d_in, generator=g) / math.sqrt(d_in)).to(DEVICE, dtype)
    V = torch.randn(n, d_out, generator=g).to(DEVICE, dtype) / math.sqrt(n)
    return x, K, V


def run(x, K, V, tau, norm, impl, dout):
    args = [t.detach().requires_grad_() for t in (x, K, V, tau)]
    with poisoned_outputs():
        out = pattention(*args[:3], args[3], norm=norm, impl=impl)
        return out, torch.autograd.grad(out, args, dout.to(out.dtype))


@pytest.mark.parametrize("norm", ["l2_gelu", "l1_gelu", "softmax"])
def test_naive_matches_formula(norm):
    x, K, V = inputs((2, 7), 5, 3, 11, torch.float64)
    tau = torch.tensor(default_tau(norm, 11), dtype=torch.float64)
    torch.testing.assert_close(pattention(x, K, V, tau, norm=norm, impl="naive"), by_formula(x, K, V, tau, norm))


SHAPES = [((2, 7), 5, 3, 11), ((1,), 16, 16, 4), ((3, 40), 70, 33, 130), ((1, 1, 65), 64, 96, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("norm", ["l2_gelu", "l1_gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x{}din{}dout{}n{}".format(*s))
def test_triton_matches_naive(shape, norm, dtype):
    x, K, V = inputs(*shape, dtype)
    tau = torch.tensor(default_tau(norm, shape[3]), device=DEVICE)
    dout = torch.randn(*shape[0], shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, ref_grads = run(x.double(), K.double(), V.double(), tau.double(), norm, "naive", dout.to(DEVICE))
    out, grads = run(x, K, V, tau, norm, "triton", dout.to(DEVICE))
    assert out.dtype == dtype
    check("pattention", "triton", dtype, "out", out, ref)
    for name, a, b in zip(("dx", "dK", "dV", "dtau"), grads, ref_grads):
        check("pattention", "triton", dtype, name, a, b)


def test_triton_zero_rows_and_growth():
    """A zero input row gives 0 and finite gradients; appending zero keys (growth) changes no output."""
    x, K, V = inputs((9,), 24, 20, 40, torch.float32, seed=3)
    x[4] = 0
    tau = torch.tensor(default_tau("l2_gelu", 40), device=DEVICE)
    out, grads = run(x, K, V, tau, "l2_gelu", "triton", torch.ones(9, 20, device=DEVICE))
    assert torch.equal(out[4], torch.zeros_like(out[4])) and all(torch.isfinite(g).all() for g in grads)
    K2 = torch.cat([K, torch.zeros(50, 24, device=DEVICE)])
    V2 = torch.cat([V, torch.randn(50, 20, device=DEVICE)])
    for norm in ("l2_gelu", "l1_gelu"):
        tau = torch.tensor(default_tau(norm, 40), device=DEVICE)
        before = pattention(x, K, V, tau, norm=norm, impl="triton")
        after = pattention(x, K2, V2, tau, norm=norm, impl="triton")
        assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_errors_and_auto():
    x, K, V = inputs((3,), 4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match="norm='l3' is not one of"):
        pattention(x, K, V, 1.0, norm="l3")
    with pytest.raises(ValueError, match=r"key must be \[n >= 1, 4\]"):
        pattention(x, K[:, :3], V, 1.0)
    with pytest.raises(ValueError, match="impl='triton' implements norms l2_gelu, l1_gelu, not 'softmax'"):
        pattention(x, K, V, 1.0, norm="softmax", impl="triton")
    with pytest.raises(ValueError, match="tau must be a scalar"):
        pattention(x, K, V, torch.ones(2))
    if DEVICE == "cpu":  # auto is the definition on CPU
        assert torch.equal(pattention(x, K, V, 2.0), pattention(x, K, V, 2.0, impl="naive"))
