"""The block-sparse attention core against its dense-mask definition: outputs and dq, dk, dv."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.naive import dense_mask, gather_attention, reference_attention


def random_selection(g, B, Hs, nqb, nkb, S, causal=False, qbs=None, bs=None):
    """S distinct key blocks per query block (causal: only blocks that start at or before the block's last
    query), some slots unused (-1)."""
    sel = torch.full((B, Hs, nqb, S), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hs):
            for i in range(nqb):
                n_allowed = min(nkb, ((i + 1) * qbs - 1) // bs + 1) if causal else nkb
                n = int(torch.randint(1, min(S, n_allowed) + 1, (1,), generator=g))
                sel[b, h, i, :n] = torch.randperm(n_allowed, generator=g)[:n]
    return sel


CASES = [  # B, H, Hkv, Tq, hd, block_size, q_block_size, S, Hs, causal, token_mask, key_mask
    (1, 1, 1, 16, 8, 4, None, 2, 1, False, False, False),
    (2, 3, 3, 29, 8, 8, None, 3, 1, False, False, True),  # T not a multiple of the block
    (2, 4, 4, 37, 16, 8, None, 3, 4, True, False, False),  # per-head selection, causal
    (3, 2, 1, 45, 8, 16, 4, 3, 2, True, True, False),  # GQA, small query blocks, per-token mask
    (1, 4, 2, 50, 4, 7, 5, 4, 1, False, True, True),
    (2, 2, 2, 27, 8, 4, 1, 3, 2, True, False, True),  # per-query selections (grouped by key block)
    (1, 3, 1, 30, 8, 8, 1, 2, 1, False, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}T{}hd{}bs{}qbs{}S{}Hs{}c{}tm{}km{}".format(*c))
def test_matches_dense_mask_reference(case):
    B, H, Hkv, T, hd, bs, qbs, S, Hs, causal, use_tm, use_km = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    qb = qbs or bs
    nqb, nkb = math.ceil(T / qb), math.ceil(T / bs)
    sel = random_selection(g, B, Hs, nqb, nkb, S, causal, qb, bs)
    tm = torch.rand(B, Hs, T, S, generator=g) < 0.7 if use_tm else None
    km = torch.rand(B, T, generator=g) < 0.8 if use_km else None
    out = block_sparse_attention(
        q, k, v, sel, block_size=bs, q_block_size=qbs, causal=causal, token_mask=tm, key_mask=km, scale=0.3
    )
    mask = dense_mask(sel, T, T, H, bs, qb, causal, tm, km)
    assert mask.any(-1).float().mean() > 0.5  # most queries see something: the test is not vacuous
    rep = H // Hkv
    ref = reference_attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), mask, scale=0.3)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")
    if Hs == 1:  # the forward-only path for a selection shared by all heads (inference)
        with torch.no_grad():
            out = block_sparse_attention(
                q, k, v, sel, block_size=bs, q_block_size=qbs, causal=causal, token_mask=tm, key_mask=km, scale=0.3
            )
        torch.testing.assert_close(out, ref.detach())


def test_gradcheck_small():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 11, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sel = torch.tensor([[[[0, 2], [1, -1], [2, 0]]]])
    fn = lambda q, k, v: block_sparse_attention(q, k, v, sel, block_size=4, causal=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_selecting_every_block_is_dense_attention(causal):
    g = torch.Generator().manual_seed(1)
    B, T, H, hd, bs = 2, 50, 3, 16, 8
    q, k, v = (torch.randn(B, T, H, hd, generator=g) for _ in range(3))
    n = math.ceil(T / bs)
    sel = torch.arange(n).expand(B, 1, n, n)
    out = block_sparse_attention(q, k, v, sel, block_size=bs, causal=causal)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float32_and_float16_inputs_match_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 24, 2, 8, generator=g) for _ in range(3))
    sel = torch.tensor([[0, 2], [1, 0], [2, 1]]).expand(2, 1, 3, 2)
    ref = reference_attention(q, k, v, dense_mask(sel, 24, 24, 2, 8, 8))
    torch.testing.assert_close(block_sparse_attention(q, k, v, sel, block_size=8), ref, rtol=1e-5, atol=1e-5)
    half = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel, block_size=8)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.05)


def test_query_that_sees_nothing_outputs_zero_and_gets_zero_grad():
    q, k, v = (torch.randn(1, 8, 1, 4, requires_grad=True) for _ in range(3))
    sel = torch.tensor([[[[1], [-1]]]])  # second query block: no key block
    out = block_sparse_attention(q, k, v, sel, block_size=4)
    assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, 4:], torch.zeros_like(q.grad[:, 4:]))
    assert torch.equal(k.grad[:, :4], torch.zeros_like(k.grad[:, :4]))  # key block 0 was never selected


def test_gather_reference_matches_dense_mask_reference():
    g = torch.Generator().manual_seed(3)
    B, H, T, hd, bs, S = 2, 4, 36, 8, 4, 3
    q, k, v = (torch.randn(B, T, H, hd, generator=g, dtype=torch.float64) for _ in range(3))
    for Hs in (1, H):
        sel = torch.stack([torch.randperm(9, generator=g)[:S] for _ in range(B * Hs * 9)]).view(B, Hs, 9, S)
        km = torch.rand(B, T, generator=g) < 0.9
        ref = reference_attention(q, k, v, dense_mask(sel, T, T, H, bs, bs, key_mask=km))
        torch.testing.assert_close(gather_attention(q, k, v, sel, block_size=bs, key_mask=km), ref)


def test_bad_selection_shape_is_a_clear_error():
    q = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match="kv_blocks"):
        block_sparse_attention(q, q, q, torch.zeros(1, 1, 3, 1, dtype=torch.long), block_size=4)
