"""Duo FFN: forced routes equal the plain modules exactly, compute follows the route, routing modes, causality."""

import pytest
import torch
import torch.nn.functional as F

import arch
from arch.config import LayerContext
from arch.duo import BIG, SKIP, SMALL, DuoFFN
from arch.mlp import MLP

from ..conftest import assert_causal


def ctx(n_layers=2, layer_idx=0, d=32):
    return LayerContext(
        d_model=d,
        n_heads=2,
        n_kv_heads=2,
        max_seq_len=16,
        n_layers=n_layers,
        layer_idx=layer_idx,
        proj={"type": "linear"},
        norm={"type": "rmsnorm"},
        rope_theta=1e4,
        rope_fraction=1.0,
        init_std=0.02,
    )


def duo(**kw):
    torch.manual_seed(0)
    return DuoFFN(ctx(), d_ff=64, small_ratio=8, **kw)


def plain_mlp_with(weights: MLP, d_ff: int) -> MLP:
    """An independent plain SwiGLU MLP (the ``mlp`` block) holding the same weights."""
    ref = MLP(ctx(), d_ff=d_ff)
    ref.load_state_dict(weights.state_dict())
    return ref


def swiglu(m: MLP, x):  # the definition, written out
    return F.linear(F.silu(F.linear(x, m.w1.weight)) * F.linear(x, m.w3.weight), m.w2.weight)


X = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("routing", ["random", "router"])
def test_forced_big_equals_plain_swiglu_mlp_exactly(routing):
    m = duo(routing=routing).train()
    out = m(X, route=torch.full((3, 11), BIG))
    assert torch.equal(out, plain_mlp_with(m.big, 64)(X))
    torch.testing.assert_close(out, swiglu(m.big, X))
    assert m.big.w1.weight.shape == (64, 32) and m.small.w1.weight.shape == (8, 32)  # small = d_ff / 8


def test_forced_small_equals_small_mlp_and_skip_contributes_exactly_zero():
    m = duo()
    assert torch.equal(m(X, route=torch.full((3, 11), SMALL)), plain_mlp_with(m.small, 8)(X))
    x = X.clone().requires_grad_()
    out = m(x, route=torch.full((3, 11), SKIP))
    assert torch.equal(out, torch.zeros_like(X))
    (out.sum() + 0 * x.sum()).backward()
    assert all(p.grad is None for p in m.parameters())  # nothing was computed
    assert torch.equal(x.grad, torch.zeros_like(X))


def test_mixed_routes_compute_only_the_chosen_module_per_token():
    m = duo()
    route = torch.randint(0, 3, (3, 11), generator=torch.Generator().manual_seed(2))
    out = m(X, route=route)
    ref = torch.stack([torch.zeros_like(X), m.small(X), m.big(X)])  # [3, B, T, D]
    expect = ref.gather(0, route[None, ..., None].expand(1, 3, 11, 32))[0]
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.route_fraction, torch.bincount(route.flatten(), minlength=3) / route.numel())
    # compute follows the route: with no BIG token the big module gets no gradient at all
    m(X, route=torch.where(route == BIG, SMALL, route)).sum().backward()
    assert all(p.grad is None for p in m.big.parameters())
    assert all(p.grad is not None for p in m.small.parameters())


def test_random_routing_is_seeded_and_follows_p_big_p_skip():
    m = duo(p_big=0.3, p_skip=0.2)
    x = torch.randn(8, 16, 32)
    m.set_route_seed(5)
    a = m.choose_route(x)
    m.set_route_seed(5)
    assert torch.equal(a, m.choose_route(x))
    assert not torch.equal(a, m.choose_route(x))
    big = torch.stack([m.choose_route(x) for _ in range(50)])
    frac = torch.bincount(big.flatten(), minlength=3) / big.numel()
    torch.testing.assert_close(frac, torch.tensor([0.2, 0.5, 0.3]), atol=0.02, rtol=0)


def test_fixed_routing_uses_the_layers_route():
    torch.manual_seed(0)
    routes = ["big", "skip", "small"]
    layers = [DuoFFN(ctx(3, i), d_ff=64, small_ratio=8, routing="fixed", fixed_routes=routes) for i in range(3)]
    for layer, r in zip(layers, (BIG, SKIP, SMALL)):
        torch.testing.assert_close(layer(X), layer(X, route=torch.full((3, 11), r)), rtol=0, atol=0)


def test_router_soft_mixture_while_training_hard_argmax_at_inference():
    m = duo(routing="router")
    with torch.no_grad():
        m.router.weight.normal_(generator=torch.Generator().manual_seed(3))
    m.router_inv_temp = 2.0
    m.train()
    out = m(X)
    p = torch.softmax(2.0 * m.router(X), -1)
    p[..., SKIP] = 0  # SKIP is not a choice without router_skip
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(out, p[..., SMALL, None] * m.small(X) + p[..., BIG, None] * m.big(X))
    torch.testing.assert_close(m.p_big, p[..., BIG].mean())
    m.eval()
    hard = p.argmax(-1)
    assert set(hard.unique().tolist()) == {SMALL, BIG}
    torch.testing.assert_close(m(X), m(X, route=hard))
    assert m.p_big is None


@pytest.mark.parametrize("router_skip", [False, True])
def test_router_gradient_is_that_of_the_soft_mixture_and_the_budget_loss(router_skip):
    """Every gradient of CE-like loss <out, G> + α(P_big − budget)² equals that of the paper's soft mixture written
    out here (Sec. 3.3); hard routing (inference, forced routes) gives the router no gradient at all."""
    m = duo(routing="router", router_skip=router_skip).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.router.weight.normal_(generator=g)
        m.router.bias.normal_(generator=g)
    m.router_inv_temp = 1.7
    G = torch.randn(3, 11, 32, generator=g)  # an upstream gradient
    params = dict(m.named_parameters())

    def loss_of(out, p_big):
        return (out * G).sum() + 0.3 * (p_big - 0.25) ** 2

    x = X.clone().requires_grad_()
    got = torch.autograd.grad(loss_of(m(x), m.p_big), [x, *params.values()])

    ref = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    xr = X.clone().requires_grad_()
    logits = 1.7 * F.linear(xr, ref["router.weight"], ref["router.bias"])  # [B, T, 3]
    if not router_skip:
        logits = torch.cat([torch.full_like(logits[..., :1], -torch.inf), logits[..., 1:]], -1)
    p = torch.softmax(logits, -1)
    small = F.linear(
        F.silu(F.linear(xr, ref["small.w1.weight"])) * F.linear(xr, ref["small.w3.weight"]), ref["small.w2.weight"]
    )
    big = F.linear(
        F.silu(F.linear(xr, ref["big.w1.weight"])) * F.linear(xr, ref["big.w3.weight"]), ref["big.w2.weight"]
    )
    want = torch.autograd.grad(loss_of(p[..., 1:2] * small + p[..., 2:3] * big, p[..., 2].mean()), [xr, *ref.values()])
    for name, a, b in zip(["x", *params], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert got[1 + list(params).index("router.weight")].abs().sum() > 0

    m.eval()  # hard argmax: the route is an index; nothing flows back to the router
    m(x).pow(2).sum().backward()
    assert m.router.weight.grad is None and m.p_big is None


MODES = {
    "random": {"routing": "random", "p_skip": 0.2},
    "fixed": {"routing": "fixed", "fixed_routes": ["big", "small"]},
    "router": {"routing": "router", "router_skip": True},
}


def make_lm(**ffn):
    torch.manual_seed(0)
    return arch.build_model(
        {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 24, "ffn": {"type": "duo", "d_ff": 64, **ffn}}
    )


@pytest.mark.parametrize("mode", [*MODES, "forced"])
@pytest.mark.parametrize("train", [True, False])
def test_lm_with_duo_ffn_is_causal_in_every_routing_mode(mode, train):
    """Perturbing tokens after t changes no logit at or before t (routes included)."""
    model = make_lm(**MODES.get(mode, {})).train(train)
    for m in model.modules():
        if isinstance(m, DuoFFN):
            with torch.no_grad():
                m.router.weight.normal_(generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(2)
    routes = torch.randint(0, 3, (2, 3, 23), generator=g) if mode == "forced" else None

    def run(ids):
        for i, m in enumerate(m for m in model.modules() if isinstance(m, DuoFFN)):
            m.set_route_seed(i)  # the same random routes for both passes
        return model(ids, routes=routes)

    assert_causal(run)


def test_checkpoints_of_every_mode_share_weights():
    a, b = make_lm(), make_lm(routing="router")
    b.load_state_dict(a.state_dict())  # strict: a random-routing model initialises a router model exactly


@pytest.mark.parametrize(
    "ffn, message",
    [
        ({"small_ratio": 5}, "small_ratio: 5 must be >= 1 and divide d_ff=64"),
        ({"p_big": 0.7, "p_skip": 0.4}, "p_big + p_skip <= 1"),
        ({"routing": "fixed"}, "fixed_routes: routing 'fixed' needs one route per layer (2 of"),
        ({"routing": "fixed", "fixed_routes": ["big"]}, "needs one route per layer"),
        ({"routing": "fixed", "fixed_routes": ["big", "huge"]}, "fixed_routes: ['big', 'huge'] is not allowed"),
        ({"fixed_routes": ["big", "big"]}, "only used with routing 'fixed'"),
        ({"routing": "learned"}, "model.ffn.routing: 'learned' is not allowed; allowed values: 'random'"),
        ({"p_bigg": 0.5}, "model.ffn.p_bigg: unknown key"),
    ],
)
def test_config_errors_name_the_key(ffn, message):
    with pytest.raises(arch.ConfigError) as e:
        make_lm(**ffn)
    assert message in str(e.value)
