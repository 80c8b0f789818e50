"""Bi-level routing attention: 2-D against independent references, 1-D causal routing semantics and limits."""

import pytest
import torch
import torch.nn.functional as F

import arch
from arch.bra import BiLevelRoutingAttention, CausalBRA, causal_routing
from kernels.block_sparse.naive import gather_attention, reference_attention


def dense_bra(m: BiLevelRoutingAttention, x):
    """Full attention (+LCE), written directly: what BRA must equal when every region is routed."""
    B, H, W, C = x.shape
    q, k, v = m.qkv(x).chunk(3, -1)
    heads = lambda t: t.reshape(B, H * W, m.n_heads, m.head_dim).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=m.scale).transpose(1, 2).reshape(B, H, W, C)
    lce = F.conv2d(v.permute(0, 3, 1, 2), m.lce.weight, m.lce.bias, padding=m.lce.padding, groups=C)
    return m.wo(o + lce.permute(0, 2, 3, 1))


def released_bra(m: BiLevelRoutingAttention, x):
    """The released algorithm (ops/bra_legacy.py) for sizes divisible by n_win: region means of detached q/k,
    top-k regions, gather the top-k-fold copy of K/V, attend, + LCE, output projection."""
    B, H, W, C = x.shape
    n = m.n_win
    q, k, v = m.qkv(x).chunk(3, -1)
    lce = F.conv2d(v.permute(0, 3, 1, 2), m.lce.weight, m.lce.bias, padding=m.lce.padding, groups=C).permute(0, 2, 3, 1)
    reg = lambda t: t.reshape(B, n, H // n, n, W // n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, -1, C)  # noqa: E731
    qr, kr, vr = reg(q), reg(k), reg(v)  # [B, n², p, C]
    r_idx = (qr.detach().mean(2) @ kr.detach().mean(2).transpose(1, 2)).topk(m.topk, -1).indices  # [B, n², k]
    heads = lambda t: t.reshape(B, -1, m.n_heads, m.head_dim)  # noqa: E731
    out = gather_attention(heads(qr), heads(kr), heads(vr), r_idx[:, None], block_size=qr.shape[2], scale=m.scale)
    out = out.reshape(B, n, n, H // n, W // n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    return m.wo(out + lce)


def make_bra(dim=32, **kw):
    torch.manual_seed(0)
    return BiLevelRoutingAttention(dim, head_dim=8, **kw)  # float32: CPU depthwise conv in float64 is very slow


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("scale", ["head_dim", "dim"])
@pytest.mark.parametrize("hw", [(12, 12), (8, 16)])
def test_2d_matches_released_algorithm(scale, hw):
    m = make_bra(n_win=4, topk=3, scale=scale)
    x = torch.randn(2, *hw, 32, requires_grad=True)
    out, ref = m(x), released_bra(m, x)
    close(out, ref)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]  # every gradient: input and all weights
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        close(a, b)


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])  # (7, 10): padded regions, whose padded keys must be masked
@pytest.mark.parametrize("topk", ["all", -1, 16])
def test_2d_all_regions_is_dense_attention_plus_lce(hw, topk):
    m = make_bra(n_win=4, topk=topk)
    x = torch.randn(2, *hw, 32)
    close(m(x), dense_bra(m, x))


def test_2d_routing_is_detached_and_sparse():
    m = make_bra(n_win=4, topk=1)
    x = torch.randn(1, 8, 8, 32)
    assert (m(x) - dense_bra(m, x)).abs().max() > 1e-3  # top-1 of 16 regions is not dense attention
    x.requires_grad_(True)
    m(x)[0, 0, 0].sum().backward()  # one query (region 0, top-1 region r): gradient reaches only regions 0, r
    touched = (x.grad.abs().sum(-1) > 0).view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4).any(-1)
    assert 1 <= touched.sum() <= 2 + 4  # + LCE's 5x5 neighbourhood may reach region 0's neighbours


def test_2d_bad_topk_is_config_error():
    with pytest.raises(arch.ConfigError, match="topk"):
        BiLevelRoutingAttention(32, n_win=2, topk=5)


def lm(**mixer):
    torch.manual_seed(0)
    return arch.build_model(
        {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 64,
            "mixer": {"type": "bra", **mixer},
        }
    ).eval()


@pytest.mark.parametrize(
    "mixer",
    [
        {"region_size": 8, "topk": 7},
        {"region_size": 8, "topk": "all"},
        {"region_size": 16, "topk": 3, "query_block": 4},
    ],
)
def test_1d_topk_covering_the_past_is_dense_causal_attention(mixer):
    model = lm(**mixer)
    dense = arch.build_model({**model.config, "mixer": {"type": "dense"}}).eval()
    dense.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (2, 61))
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def brute_force_mask(q, k, region_size, topk, attend_first):
    """Per position t: own region (causal) + top-k past complete regions by q_t · mean(k over region)."""
    B, T, H, hd = q.shape
    k = k.repeat_interleave(H // k.shape[2], 2)
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            r_t = t // region_size
            scores = [
                (q[b, t].flatten() @ k[b, r * region_size : (r + 1) * region_size].flatten(1).mean(0)).item()
                for r in range(r_t)
            ]
            chosen = sorted(range(r_t), key=lambda r: -scores[r])[:topk] + [r_t] + ([0] if attend_first else [])
            for r in chosen:
                mask[b, :, t, r * region_size : min((r + 1) * region_size, t + 1)] = True
    return mask


@pytest.mark.parametrize("attend_first", [False, True])
@pytest.mark.parametrize("query_block", [None, 2, 1])
def test_1d_routing_matches_brute_force_definition(attend_first, query_block):
    torch.manual_seed(1)
    B, T, H, hd, R = 2, 29, 4, 8, 4
    q, k, v = torch.randn(B, T, H, hd, dtype=torch.float64), *torch.randn(2, B, T, 2, hd, dtype=torch.float64)
    mixer = lm(region_size=R, topk=2, attend_first=attend_first, query_block=query_block).blocks[0].mixer
    assert isinstance(mixer, CausalBRA)
    out = mixer.attend(q, k, v)
    mask = brute_force_mask(q, k, R, 2, attend_first)
    assert mask.float().mean() < 0.4  # sparse: 2 of up to 7 past regions
    ref = reference_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), mask)
    torch.testing.assert_close(out, ref)


def test_1d_routing_never_selects_current_or_future_regions():
    torch.manual_seed(2)
    q, k = torch.randn(1, 40, 2, 4), torch.randn(1, 40, 2, 4)
    kv_blocks, token_mask = causal_routing(q, k, region_size=8, topk=3, query_block=8, attend_first=False)
    for t in range(40):
        regions = kv_blocks[0, 0, t // 8][token_mask[0, 0, t]]
        assert (regions <= t // 8).all() and (regions == t // 8).sum() == 1
        assert len(regions) == 1 + min(3, t // 8)
