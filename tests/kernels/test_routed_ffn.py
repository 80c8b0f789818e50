"""routed_ffn: the PyTorch and Triton paths against the definition (every module on every token), outputs and
the gradients of x, every weight and the residual; SKIP adds exactly zero."""

import pytest
import torch
import torch.nn.functional as F

from kernels.common import poisoned_outputs
from kernels.routed_ffn import SwiGLUWeights, routed_ffn

from .conftest import DEVICE, IMPL_DTYPES, check

CASES = [  # leading shape, D, big d_ff, small d_ff, P(skip, small, big), residual
    ((2, 7), 32, 64, 8, (0.2, 0.4, 0.4), True),
    ((3, 11), 20, 48, 5, (0.3, 0.3, 0.4), False),
    ((70,), 40, 130, 10, (0.1, 0.5, 0.4), True),  # more rows and d_ff than one tile
    ((1,), 16, 32, 4, (0.0, 0.0, 1.0), True),  # one token, all big
    ((5,), 16, 32, 4, (1.0, 0.0, 0.0), True),  # all skip
    ((4, 3), 24, 40, 8, (0.0, 1.0, 0.0), False),  # all small
]


def make(case, dtype, seed=0):
    shape, D, Fb, Fs, probs, res = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g).to(DEVICE, dtype)
    route = torch.multinomial(torch.tensor(probs), x[..., 0].numel(), replacement=True, generator=g)
    weights = [
        (torch.randn(*s, generator=g) * s[1] ** -0.5).to(DEVICE, dtype)
        for F_ in (Fs, Fb)
        for s in ((F_, D), (F_, D), (D, F_))
    ]
    residual = torch.randn(*shape, D, generator=g).to(DEVICE, dtype) if res else None
    return x, route.view(shape).to(DEVICE), weights, residual


def run(x, route, weights, residual, impl, dout):
    params = [t.detach().requires_grad_() for t in [x, *weights] + ([residual] if residual is not None else [])]
    small, big = SwiGLUWeights(*params[1:4]), SwiGLUWeights(*params[4:7])
    with poisoned_outputs():
        out = routed_ffn(params[0], route, small, big, residual=params[7] if residual is not None else None, impl=impl)
        grads = torch.autograd.grad(out, params, dout.to(out.dtype), allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.parametrize("impl, dtype", IMPL_DTYPES, ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x{}D{}F{}f{}p{}res{}".format(*c))
def test_matches_naive(case, impl, dtype):
    x, route, weights, residual = make(case, dtype)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    w64 = [w.double() for w in weights]
    ref, ref_grads = run(x.double(), route, w64, None if residual is None else residual.double(), "naive", dout)
    out, grads = run(x, route, weights, residual, impl, dout)
    assert out.dtype == dtype
    check("routed_ffn", impl, dtype, "out", out, ref)
    names = ["dx", "small dW1", "small dW3", "small dW2", "big dW1", "big dW3", "big dW2", "dresidual"]
    for name, a, b in zip(names, grads, ref_grads):
        check("routed_ffn", impl, dtype, name, a, b)
    skip = route == 0
    base = torch.zeros_like(out) if residual is None else residual
    assert torch.equal(out[skip], base[skip])  # SKIP: exactly the residual (or zero)


def test_naive_is_each_token_through_its_module():
    x, route, w, _ = make(CASES[0], torch.float64)
    out = routed_ffn(x, route, w[:3], w[3:], impl="naive")
    for t in range(x.shape[1]):
        r = int(route[0, t])
        ws = [None, w[:3], w[3:]][r]
        want = (
            torch.zeros(x.shape[-1], dtype=x.dtype, device=DEVICE)
            if ws is None
            else F.silu(ws[0] @ x[0, t]) * (ws[1] @ x[0, t]) @ ws[2].t()
        )
        torch.testing.assert_close(out[0, t], want)


def test_errors():
    x, route, w, _ = make(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="route values must be 0"):
        routed_ffn(x, route + 3, w[:3], w[3:])
    with pytest.raises(ValueError, match=r"route must be an integer tensor of shape \[2, 7\]"):
        routed_ffn(x, route[:, :3], w[:3], w[3:])
    with pytest.raises(ValueError, match=r"small: expected w1, w3 \[d_ff, 32\]"):
        routed_ffn(x, route, [w[0][:, :5], w[1], w[2]], w[3:])
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        routed_ffn(x, route, w[:3], w[3:], impl="fast")
