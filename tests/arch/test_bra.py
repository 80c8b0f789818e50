"""Bi-level routing attention: 2-D (and the released stage-4 AttentionLePE) against an independent dense-mask
reference of the released semantics, padding included; 1-D causal routing semantics and limits."""

import pytest
import torch

import arch
from arch.bra import AttentionLePE, BiLevelRoutingAttention, CausalBRA, causal_routing
from kernels.block_sparse.naive import reference_attention

from .reference_bra import reference_bra, region_ids


def make_bra(dim=32, **kw):
    torch.manual_seed(0)
    return BiLevelRoutingAttention(dim, head_dim=8, **kw).double()


def reference_of(m: BiLevelRoutingAttention, x, topk, scale, n_heads, lce_on="v"):
    """The dense-mask reference on the module's weights; topk, scale, heads given by the test."""
    w = (m.qkv.weight, m.qkv.bias, m.lce.weight, m.lce.bias, m.wo.weight, m.wo.bias)
    return reference_bra(x, *w, n_win=m.n_win, topk=topk, n_heads=n_heads, scale=scale, lce_on=lce_on)


def assert_forward_and_gradients_match(m, x, ref_fn):
    """Output and the gradients of the input and of every weight, against the reference."""
    x = x.clone().requires_grad_(True)
    out, ref = m(x), ref_fn(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "n_win, hw, topk, scale",
    [
        (4, (12, 12), 3, "dim"),  # divisible: the released code's setting (and scale)
        (4, (8, 16), 5, "head_dim"),
        (4, (7, 10), 3, "dim"),  # padded regions, each holding some real tokens
        (7, (16, 16), 4, "dim"),  # 13 of 49 regions are only padding (BiFormer stage 3 at 256x256)
        (7, (9, 9), 5, "head_dim"),  # 24 of 49 regions are only padding
    ],
)
def test_2d_matches_the_dense_mask_reference(n_win, hw, topk, scale):
    """Forward and every gradient, float64. Width 16 in 4 heads: float64 depthwise convs are slow on CPU."""
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, head_dim=4, n_win=n_win, topk=topk, scale=scale).double()
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    s = 4**-0.5 if scale == "head_dim" else 16**-0.5
    assert_forward_and_gradients_match(m, x, lambda x: reference_of(m, x, topk, s, n_heads=4))


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
@pytest.mark.parametrize("topk", ["all", -1, 16])
def test_2d_all_regions_is_dense_attention_plus_lce(hw, topk):
    m = make_bra(n_win=4, topk=topk)
    x = torch.randn(2, *hw, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_of(m, x, "all", 8**-0.5, n_heads=4))


@pytest.mark.parametrize("hw", [(16, 16), (24, 24)])  # n_win 7: the last row and column of regions are padding
def test_2d_padding_regions_are_never_routed(hw, monkeypatch):
    """Top-k = the number of regions holding real tokens (36) is full attention, like top-k = all 49 regions.
    (Before the fix the 13 empty regions had a NaN mean, ranked first, and took 13 of the 36 slots.)"""
    x = torch.randn(2, *hw, 32, dtype=torch.float64)
    full = make_bra(n_win=7, topk=49)(x)
    torch.testing.assert_close(make_bra(n_win=7, topk=36)(x), full)
    torch.testing.assert_close(full, reference_of(make_bra(n_win=7, topk=49), x, "all", 8**-0.5, n_heads=4))
    seen = []  # the selections handed to the sparse core
    core = arch.bra.block_sparse_attention
    monkeypatch.setattr(
        arch.bra, "block_sparse_attention", lambda q, k, v, sel, **kw: seen.append(sel) or core(q, k, v, sel, **kw)
    )
    real_regions = set(region_ids(*hw, 7).tolist())
    assert len(real_regions) == 36
    make_bra(n_win=7, topk=4)(x)
    assert set(seen[-1].flatten().tolist()) <= real_regions
    make_bra(n_win=7, topk=40)(x)  # more than the real regions: the 4 extra slots stay unused
    assert (seen[-1][..., :36] >= 0).all() and (seen[-1][..., 36:] == -1).all()
    assert set(seen[-1][0, 0, 0].tolist()) == real_regions | {-1}


@pytest.mark.parametrize("hw", [(7, 7), (5, 6)])
def test_attention_lepe_matches_the_released_semantics(hw):
    """Stage 4 of the released models: full attention, 8 heads, no qkv bias, scale head_dim**-0.5, LePE on x."""
    torch.manual_seed(0)
    m = AttentionLePE(64).double()  # 8 heads of 8
    assert m.qkv.bias is None and m.n_heads == 8
    x = torch.randn(2, *hw, 64, dtype=torch.float64)
    ref = lambda x: reference_of(m, x, "all", 8**-0.5, n_heads=8, lce_on="x")  # noqa: E731
    assert_forward_and_gradients_match(m, x, ref)


def test_2d_topk_1_is_sparse():
    m = make_bra(n_win=4, topk=1)
    x = torch.randn(1, 8, 8, 32, dtype=torch.float64)
    assert (m(x) - reference_of(m, x, "all", 8**-0.5, n_heads=4)).abs().max() > 1e-3  # not dense attention
    x.requires_grad_(True)
    m(x)[0, 0, 0].sum().backward()  # one query (region 0, top-1 region r): gradient reaches only regions 0, r
    touched = (x.grad.abs().sum(-1) > 0).view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4).any(-1)
    assert 1 <= touched.sum() <= 2 + 4  # + LCE's 5x5 neighbourhood may reach region 0's neighbours


def test_2d_bad_options_are_config_errors():
    with pytest.raises(arch.ConfigError, match="topk"):
        BiLevelRoutingAttention(32, n_win=2, topk=5)
    with pytest.raises(arch.ConfigError, match="n_heads: 7 must divide the width 64"):
        AttentionLePE(64, n_heads=7)


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


@pytest.mark.parametrize("topk, attend_first, n_kv_heads", [(2, False, 4), (1, True, 2), ("all", False, 2)])
def test_1d_decoding_token_by_token_equals_the_whole_sequence(topk, attend_first, n_kv_heads):
    torch.manual_seed(3)
    T = 37  # a ragged last region
    m = arch.build_model(
        {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": n_kv_heads,
            "max_seq_len": T,
            "mixer": {"type": "bra", "region_size": 8, "topk": topk, "attend_first": attend_first},
        }
    ).eval()
    x = torch.randint(0, 256, (2, T))
    cache = m.new_cache()
    with torch.no_grad():
        steps = torch.cat([m.step(x[:, i : i + 1], cache) for i in range(T)], dim=1)
        torch.testing.assert_close(steps, m(x), rtol=1e-5, atol=1e-5)
        dense = arch.build_model({**m.config, "mixer": "dense"})
        dense.load_state_dict(m.state_dict())
        assert (dense(x) - m(x)).abs().max() > 1e-3 or topk == "all"  # the routing really drops keys
