"""block_sparse_attention: every implementation against the dense-mask definition (outputs and dq, dk, dv),
the full causal selection against dense causal SDPA, the Triton tile metadata against a brute-force count."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels.block_sparse.pytorch
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.metadata import build_layout
from kernels.block_sparse.naive import dense_mask, gather_attention, reference_attention
from kernels.block_sparse.tiles import (
    plain_attention,
    plain_attention_backward,
    stack_heads,
    tile_attention,
    tile_attention_backward,
    unstack_heads,
)
from kernels.common import poisoned_outputs

from .conftest import DEVICE, IMPL_DTYPES, check


def random_selection(g, B, Hs, nqb, nkb, S, causal=False, qbs=None, bs=None, min_blocks=1):
    """Between ``min_blocks`` and S distinct key blocks per query block (causal: only blocks that start at or
    before the block's last query), the other slots unused (-1)."""
    sel = torch.full((B, Hs, nqb, S), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hs):
            for i in range(nqb):
                n_allowed = min(nkb, ((i + 1) * qbs - 1) // bs + 1) if causal else nkb
                n = int(torch.randint(min_blocks, min(S, n_allowed) + 1, (1,), generator=g))
                sel[b, h, i, :n] = torch.randperm(n_allowed, generator=g)[:n]
    return sel


CASES = [  # B, H, Hkv, T, hd, block_size, q_block_size, S, Hs, causal, token_mask, key_mask
    (1, 1, 1, 1, 8, 4, None, 1, 1, False, False, False),  # T = 1
    (1, 1, 1, 16, 8, 4, None, 2, 1, False, False, False),
    (2, 3, 3, 29, 8, 8, None, 3, 1, False, False, True),  # T not a multiple of the block, key mask
    (2, 4, 4, 37, 16, 8, None, 3, 4, True, False, False),  # per-head selection, causal
    (3, 2, 1, 45, 8, 16, 4, 3, 2, True, True, False),  # GQA, small query blocks, per-token mask
    (1, 4, 2, 50, 4, 7, 5, 4, 1, False, True, True),  # odd block sizes
    (2, 2, 2, 27, 8, 4, 1, 3, 2, True, False, True),  # per-query selections (1-D causal BRA, query_block 1)
    (1, 3, 1, 30, 8, 8, 1, 2, 1, False, True, False),
    (1, 2, 1, 100, 64, 1, 32, 40, 1, True, False, False),  # one key per slot (DHSA)
    (2, 2, 2, 150, 32, 64, 16, 3, 1, True, True, False),  # causal BRA: regions of 64, query blocks of 16
    (1, 2, 2, 196, 32, 49, None, 2, 1, False, False, True),  # 2-D BRA: 7×7 regions, padding masked
]
IDS = "B{}H{}kv{}T{}hd{}bs{}qbs{}S{}Hs{}c{}tm{}km{}"


def make_case(case, dtype, min_blocks=1):
    B, H, Hkv, T, hd, bs, qbs, S, Hs, causal, use_tm, use_km = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(B, T, H, hd, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, T, Hkv, hd, generator=g).to(DEVICE, dtype) for _ in range(2))
    qb = qbs or bs
    nqb, nkb = math.ceil(T / qb), math.ceil(T / bs)
    sel = random_selection(g, B, Hs, nqb, nkb, S, causal, qb, bs, min_blocks).to(DEVICE)
    tm = (torch.rand(B, Hs, T, S, generator=g) < 0.7).to(DEVICE) if use_tm else None
    km = (torch.rand(B, T, generator=g) < 0.8).to(DEVICE) if use_km else None
    kw = dict(block_size=bs, q_block_size=qbs, causal=causal, token_mask=tm, key_mask=km, scale=0.3)
    return (q, k, v), sel, kw


def attention_and_grads(qkv, sel, kw, impl, dout):
    qkv = [t.detach().requires_grad_() for t in qkv]
    with poisoned_outputs():
        out = block_sparse_attention(*qkv, sel, impl=impl, **kw)
        grads = torch.autograd.grad(out, qkv, dout.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("impl, dtype", IMPL_DTYPES, ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: IDS.format(*c))
def test_matches_naive(case, impl, dtype):
    qkv, sel, kw = make_case(case, dtype)
    q64 = [t.double() for t in qkv]
    dout = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    ref, ref_grads = attention_and_grads(q64, sel, kw, "naive", dout)
    mask = dense_mask(
        sel,
        case[3],
        case[3],
        case[1],
        kw["block_size"],
        kw["q_block_size"] or kw["block_size"],
        kw["causal"],
        kw["token_mask"],
        kw["key_mask"],
    )
    assert mask.any(-1).float().mean() > 0.3  # many queries see something: the test is not vacuous
    out, grads = attention_and_grads(qkv, sel, kw, impl, dout)
    assert out.dtype == dtype
    check("block_sparse_attention", impl, dtype, "out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        check("block_sparse_attention", impl, dtype, name, a, b)
    if impl == "torch":  # the forward alone, outside autograd
        with torch.no_grad():
            check(
                "block_sparse_attention",
                impl,
                dtype,
                "out (no grad)",
                block_sparse_attention(*qkv, sel, impl=impl, **kw),
                ref,
            )


@pytest.mark.parametrize("tiling", ["query blocks", "key blocks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: IDS.format(*c))
def test_each_torch_tiling_matches_naive(case, tiling, monkeypatch):
    """impl="torch" tiles the work by query block or by key block, chosen from the selection: each tiling forced
    on every case (fp32), output and every gradient."""
    monkeypatch.setattr(kernels.block_sparse.pytorch, "_by_key_block", lambda *args: tiling == "key blocks")
    qkv, sel, kw = make_case(case, torch.float32)
    dout = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    ref, ref_grads = attention_and_grads([t.double() for t in qkv], sel, kw, "naive", dout)
    out, grads = attention_and_grads(qkv, sel, kw, "torch", dout)
    check("block_sparse_attention", "torch", torch.float32, f"out ({tiling})", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        check("block_sparse_attention", "torch", torch.float32, f"{name} ({tiling})", a, b)


@pytest.mark.parametrize("q_block_size", [32, 1])
def test_torch_path_keeps_for_backward_only_inputs_output_and_row_statistics(q_block_size):
    """The backward pass recomputes the attention: autograd keeps q, k, v, the output and per-row statistics
    (log-sum-exp), not the gathered keys nor any score matrix."""
    g = torch.Generator().manual_seed(9)
    B, T, H, Hkv, hd, bs = 1, 512, 4, 2, 16, 32
    q = torch.randn(B, T, H, hd, generator=g, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, hd, generator=g, requires_grad=True) for _ in range(2))
    sel = random_selection(g, B, 1, T // q_block_size, T // bs, 6, True, q_block_size, bs)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_sparse_attention(q, k, v, sel, block_size=bs, q_block_size=q_block_size, causal=True)
    tensors = 4 * (q.numel() + k.numel() + v.numel() + out.numel())
    stats = 4 * B * T * H + T  # float32 log-sum-exp per row and head, bool per key
    assert sum(saved) <= tensors + stats, (sum(saved), tensors + stats)
    assert sum(saved) >= tensors  # the hook saw the saved tensors (the test is not vacuous)


@pytest.mark.parametrize("h, hkv, shared_bias", [(2, 2, False), (6, 2, False), (6, 2, True)])
def test_tile_attention_fused_and_plain_match_a_float64_reference(h, hkv, shared_bias):
    """The two tile implementations (PyTorch's fused CPU kernel, with grouped-query heads stacked as rows; plain
    matmuls) against autograd on a float64 transcription: output, log-sum-exp of the rows that see a key, and
    dq, dk, dv from the final output and log-sum-exp; some rows see no key; the bias per tile or one bias
    expanded over the tiles (as the diagonal masks are)."""
    g = torch.Generator().manual_seed(10)
    n, L, S, hd, scale = 3, 7, 11, 8, 0.4
    q = torch.randn(n, h, L, hd, generator=g, dtype=torch.float64)
    k, v = (torch.randn(n, hkv, S, hd, generator=g, dtype=torch.float64) for _ in "kv")
    seen = torch.rand(1 if shared_bias else n, 1, L, S, generator=g) < 0.6
    seen[0, 0, 2] = False  # a row that sees nothing
    seen = seen.expand(n, 1, L, S)
    bias = torch.zeros(seen.shape[0], 1, L, S, dtype=torch.float64).masked_fill(~seen, float("-inf"))
    bias = bias[:1].expand(n, 1, L, S) if shared_bias else bias
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.repeat_interleave(h // hkv, 1).transpose(-1, -2)) * scale + bias  # head i reads kv head i // rep
    row = seen.any(-1).expand(n, h, L)
    ref = (torch.softmax(s.masked_fill(~row[..., None], 0.0), -1) * row[..., None]) @ v64.repeat_interleave(h // hkv, 1)
    ref_lse = torch.logsumexp(s.detach(), -1)
    dout = torch.randn(n, h, L, hd, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    lse = torch.where(row, ref_lse, 0.0)
    for forward, backward in ((tile_attention, tile_attention_backward), (plain_attention, plain_attention_backward)):
        out, got_lse = forward(q, k, v, bias, scale)
        torch.testing.assert_close(out, ref.detach())
        torch.testing.assert_close(got_lse[row], ref_lse[row])
        for a, b in zip(backward(dout, q, k, v, ref.detach(), lse, bias, scale), ref_grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("h, hkv", [(2, 2), (6, 2)])
def test_causal_tiles_and_writing_into_strided_views_match_a_float64_reference(h, hkv):
    """The backward of ``causal=True`` tiles (square, query i sees keys 0..i: the fused kernel's own mask,
    grouped-query heads read in place, as a block's own keys run) and results written through ``out`` /
    ``dq_out`` into views of a [n, L, h, hd] buffer (the layout the query-block tiling writes in place) against
    autograd on a float64 transcription; a non-square causal tile is refused."""
    g = torch.Generator().manual_seed(11)
    n, L, hd, scale = 3, 9, 8, 0.3
    q = torch.randn(n, h, L, hd, generator=g, dtype=torch.float64)
    k, v = (torch.randn(n, hkv, L, hd, generator=g, dtype=torch.float64) for _ in "kv")
    dout = torch.randn(n, h, L, hd, generator=g, dtype=torch.float64)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for causal in (True, False):
        q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
        s = (q64 @ k64.repeat_interleave(h // hkv, 1).transpose(-1, -2)) * scale
        s = s.masked_fill(future, float("-inf")) if causal else s
        ref, ref_lse = torch.softmax(s, -1) @ v64.repeat_interleave(h // hkv, 1), torch.logsumexp(s, -1)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
        o_buf = torch.full((n, L, h, hd), float("nan"), dtype=torch.float64)
        lse_buf = torch.full((n, h, L), float("nan"), dtype=torch.float64)
        bias = torch.zeros(1, 1, L, L, dtype=torch.float64).masked_fill(future, float("-inf")) if causal else None
        got, got_lse = tile_attention(q, k, v, bias, scale, out=(o_buf.transpose(1, 2), lse_buf))
        assert got.data_ptr() == o_buf.data_ptr() and got_lse is lse_buf
        torch.testing.assert_close(o_buf.transpose(1, 2), ref.detach())
        torch.testing.assert_close(lse_buf, ref_lse.detach())
        dq_buf = torch.full((n, L, h, hd), float("nan"), dtype=torch.float64)
        grads = tile_attention_backward(
            dout, q, k, v, got, got_lse, None, scale, causal=causal, dq_out=dq_buf.transpose(1, 2)
        )
        assert grads[0].data_ptr() == dq_buf.data_ptr()
        for a, b in zip((dq_buf.transpose(1, 2), *grads[1:]), ref_grads):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="square"):
        tile_attention_backward(dout, q, k[:, :, :-1], v[:, :, :-1], got, got_lse, None, scale, causal=True)


def test_stack_heads_puts_each_query_of_a_group_on_consecutive_rows():
    """Row t·rep + j of a stacked key/value head is query t of its j-th query head; unstack inverts it."""
    n, h, L, hd, rep = 2, 6, 5, 3, 3
    x = torch.randn(n, h, L, hd)
    stacked = stack_heads(x, rep)  # [n, h / rep, L·rep, hd]
    assert stacked.shape == (n, h // rep, L * rep, hd)
    for kv in range(h // rep):
        for t in range(L):
            for j in range(rep):
                assert torch.equal(stacked[:, kv, t * rep + j], x[:, kv * rep + j, t])
    assert torch.equal(unstack_heads(stacked, rep), x)
    assert torch.equal(unstack_heads(stack_heads(x[..., 0], rep), rep), x[..., 0])  # row statistics [n, h, L]


def test_some_rows_select_no_block():
    """The cases above draw 1..S blocks; here many query blocks select none (all slots -1)."""
    case = (2, 2, 1, 70, 16, 8, 16, 3, 2, True, False, False)
    qkv, sel, kw = make_case(case, torch.float32, min_blocks=0)
    assert (sel < 0).all(-1).any()
    dout = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(DEVICE)
    ref, ref_grads = attention_and_grads([t.double() for t in qkv], sel, kw, "naive", dout)
    for impl in ("torch", "triton"):  # block indices as int32 here
        out, grads = attention_and_grads(qkv, sel.int(), kw, impl, dout)
        check("block_sparse_attention", impl, torch.float32, "out", out, ref)
        for a, b in zip(grads, ref_grads):
            check("block_sparse_attention", impl, torch.float32, "grad", a, b)


def mixed_kinds_selection(nqb: int, S: int, m: int) -> torch.Tensor:
    """Causal selection over query blocks of m key blocks: rows that end with their own m blocks (``own`` tiles),
    rows of earlier blocks only (``none``), rows with unused slots, with their own blocks out of order or with
    only some of them (``full``), in a shuffled slot order. -> [1, 1, nqb, S]."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(nqb):
        own, earlier = list(range(i * m, i * m + m)), torch.randperm(i * m, generator=g).tolist()
        kind = i % 4
        if kind == 0:  # diagonal: all slots used (when there are enough earlier blocks)
            pick = earlier[: S - m] + own
        elif kind == 1:  # none: earlier blocks only
            pick = earlier[:S] or own
        elif kind == 2:  # some of its own blocks (all when m = 1), unused slots
            pick = earlier[:1] + own[: max(1, m - 1)]
        else:  # fewer earlier blocks than slots
            pick = earlier[: max(0, S - m - 2)] + own
        pick = [pick[j] for j in torch.randperm(len(pick), generator=g)]
        rows.append(pick + [-1] * (S - len(pick)))
    return torch.tensor(rows)[None, None]


@pytest.mark.parametrize("bs, qbs", [(8, 8), (4, 8), (1, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_every_mask_kind_matches_naive(bs, qbs, causal):
    """The query-block tiling sorts query blocks by the mask their tile needs (none, per-key,
    per-query-and-key, and a block's own keys in a tile of their own merged by log-sum-exp: chunked.plan): a
    selection that produces every kind, checked against the definition (output, dq, dk, dv), with GQA and a
    ragged last block."""
    from kernels.block_sparse.chunked import plan

    T, H, Hkv, hd, m = 61, 4, 2, 16, qbs // bs
    nqb, S = math.ceil(T / qbs), 3 * m
    sel = mixed_kinds_selection(nqb, S, m).clamp_max(math.ceil(T / bs) - 1)
    sel = torch.where((sel[..., :, None] == sel[..., None, :]).triu(1).any(-2), -1, sel)  # no repeats
    g = torch.Generator().manual_seed(bs + qbs)
    q = torch.randn(1, T, H, hd, generator=g)
    k, v = (torch.randn(1, T, Hkv, hd, generator=g) for _ in range(2))
    key_ok = (torch.arange(math.ceil(T / bs) * bs) < T).view(1, -1, bs)
    kinds = {p.kind for p in plan(sel[:, 0], None, key_ok, qbs, causal, causal, False)}
    # query blocks of one key block: a row that holds its own block gets an own tile; without a causal mask only
    # the ragged last block needs a mask
    expected = (
        {"none", "own"} | ({"full"} if m > 1 else set()) if causal else {"none"} | ({"keys"} if T % bs else set())
    )
    assert kinds == expected, kinds
    kw = dict(block_size=bs, q_block_size=qbs, causal=causal, scale=0.3)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ref, ref_grads = attention_and_grads([t.double() for t in (q, k, v)], sel, kw, "naive", dout)
    out, grads = attention_and_grads((q, k, v), sel, kw, "torch", dout)
    check("block_sparse_attention", "torch", torch.float32, "out (mask kinds)", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        check("block_sparse_attention", "torch", torch.float32, f"{name} (mask kinds)", a, b)


def test_tiles_hold_at_most_half_of_k_in_keys_and_a_quarter_per_query_side_tensor():
    """Memory bound of the query-block tiling (chunked.TileBound): on a causal selection whose rows split into an
    earlier-blocks tile and an own-block tile, every tile's gathered keys are at most half of K's keys and each
    query-side tensor (qbs·H/Hkv keys' worth per query block) at most a quarter; the own tiles, one key block per
    row, would otherwise take every query block at once."""
    from kernels.block_sparse.chunked import TileBound, plan, tiles_of

    T, bs, H, Hkv = 2048, 64, 8, 2
    n = T // bs
    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.randperm(i, generator=g)[:5], torch.tensor([i])]) for i in range(n)]
    sel = torch.stack([F.pad(r, (0, 6 - len(r)), value=-1) for r in rows])[None]  # [1, nqb, 6]
    key_ok = torch.ones(1, n, bs, dtype=torch.bool)
    parts = plan(sel, None, key_ok, bs, True, True, False)
    assert {p.kind for p in parts} == {"none", "own"}
    bound = TileBound(T, bs, bs * H // Hkv)
    sizes = {p.kind: [] for p in parts}
    for part in parts:
        for tile_rows, _, blocks, _, _, _ in tiles_of(part, bound):
            sizes[part.kind].append(len(tile_rows))
            assert len(tile_rows) * blocks.shape[1] * bs <= max(T // 2, blocks.shape[1] * bs)
            assert len(tile_rows) * bound.q_keys <= max(T // 4, bound.q_keys)
    assert sum(sizes["own"]) == n and max(sizes["own"]) == T // 4 // bound.q_keys  # bounded by the query side


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("hd, T, bs", [(64, 100, 32), (128, 77, 16)])
def test_every_causal_block_selected_is_dense_causal_sdpa(impl, hd, T, bs):
    """Output AND dq, dk, dv (published block-sparse backwards have shipped wrong gradients with an exact
    forward): full selection = dense causal attention, ragged T, GQA."""
    g = torch.Generator().manual_seed(hd + T)
    B, H, Hkv = 2, 4, 2
    q = torch.randn(B, T, H, hd, generator=g).to(DEVICE)
    k, v = (torch.randn(B, T, Hkv, hd, generator=g).to(DEVICE) for _ in range(2))
    n = math.ceil(T / bs)
    sel = torch.arange(n, device=DEVICE).expand(B, 1, n, n)
    dout = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64).to(DEVICE)
    out, grads = attention_and_grads((q, k, v), sel, dict(block_size=bs, causal=True), impl, dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    check("block_sparse_attention", impl, torch.float32, "out vs SDPA", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        check("block_sparse_attention", impl, torch.float32, f"{name} vs SDPA", a, b)


def test_gradcheck_small_torch_path():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 11, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sel = torch.tensor([[[[0, 2], [1, -1], [2, 0]]]])
    fn = lambda q, k, v: block_sparse_attention(q, k, v, sel, block_size=4, causal=True, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_query_that_sees_nothing_outputs_zero_and_gets_zero_grad(impl):
    q, k, v = (torch.randn(1, 8, 1, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    sel = torch.tensor([[[[1], [-1]]]], device=DEVICE)  # second query block: no key block
    with poisoned_outputs():
        out = block_sparse_attention(q, k, v, sel, block_size=4, impl=impl)
        out.sum().backward()
    assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))
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


@pytest.mark.parametrize("case", [CASES[4], CASES[6], CASES[8], CASES[9]], ids=lambda c: IDS.format(*c))
def test_tile_metadata_matches_brute_force(case):
    """Every (selection, query tile, key tile) entry, its bits, per-query bits and ``full`` flag against the
    dense mask; the transposed list holds the same pairs, grouped by key tile."""
    B, H, Hkv, T, hd, bs, qbs, S, Hs, causal, _, _ = case
    _, sel, kw = make_case(case, torch.float32)
    qb = qbs or bs
    lay = build_layout(sel, T, T, **{**{k: v for k, v in kw.items() if k != "scale"}, "q_block_size": qb})
    seen = dense_mask(sel, T, T, Hs, bs, qb, causal, kw["token_mask"], kw["key_mask"])  # [B, Hs, T, T]
    KT, nt, nkt = lay.KT, lay.n_qtiles, lay.n_ktiles
    seen = F.pad(seen, (0, nkt * KT - T)).view(B, Hs, T, nkt, KT)
    pack = lambda m: _signed(sum(1 << c for c in range(KT) if m[c]))  # noqa: E731  bool [KT] -> int64 bits
    row_ptr, kts, bits = lay.row_ptr.tolist(), lay.e_ktile.tolist(), lay.e_bits.tolist()
    want_pairs, got_pairs = set(), set()
    for g in range(B * Hs):
        b, h = divmod(g, Hs)
        for t in range(nt):
            m = seen[b, h, int(lay.q_start[t]) : int(lay.q_end[t])]  # [rows, nkt, KT]
            got = {kts[e]: e for e in range(row_ptr[g * nt + t], row_ptr[g * nt + t + 1])}
            assert set(got) == {j for j in range(nkt) if m[:, j].any()}, (g, t)
            for j, e in got.items():
                assert bits[e] == pack(m[:, j].any(0)), (g, t, j)
                assert bool(lay.e_full[e]) == bool(m[:, j].all()), (g, t, j)
                if lay.e_rowbits is not None:
                    assert lay.e_rowbits[e, : len(m)].tolist() == [pack(row) for row in m[:, j]], (g, t, j)
                want_pairs.add((g, j, t))
    col_ptr, tq = lay.col_ptr.tolist(), lay.t_qtile.tolist()
    for g in range(B * Hs):
        for j in range(nkt):
            ts = tq[col_ptr[g * nkt + j] : col_ptr[g * nkt + j + 1]]
            assert ts == sorted(ts)
            got_pairs |= {(g, j, t) for t in ts}
            assert all(kts[e] == j for e in lay.t_entry[col_ptr[g * nkt + j] : col_ptr[g * nkt + j + 1]].tolist())
    assert got_pairs == want_pairs


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def test_bad_arguments_are_clear_errors():
    q = torch.randn(1, 16, 2, 4)
    sel = torch.zeros(1, 1, 4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="kv_blocks: expected shape"):
        block_sparse_attention(q, q, q, torch.zeros(1, 1, 3, 1, dtype=torch.long), block_size=4)
    with pytest.raises(ValueError, match=r"block indices must be in \[0, 4\)"):
        block_sparse_attention(q, q, q, sel + 4, block_size=4)
    with pytest.raises(ValueError, match="one dtype"):
        block_sparse_attention(q, q.double(), q, sel, block_size=4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        block_sparse_attention(q, torch.randn(1, 16, 3, 4), torch.randn(1, 16, 3, 4), sel, block_size=4)
    with pytest.raises(ValueError, match="token_mask: expected bool"):
        block_sparse_attention(q, q, q, sel, block_size=4, token_mask=torch.ones(1, 1, 16, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask: expected bool"):
        block_sparse_attention(q, q, q, sel, block_size=4, key_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        block_sparse_attention(q, q, q, sel, block_size=4, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' does not take torch.float64"):
        block_sparse_attention(q.double(), q.double(), q.double(), sel, block_size=4, impl="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only behaviour")
def test_auto_is_torch_on_cpu_and_triton_needs_the_interpreter():
    code = (
        "import torch\nfrom kernels.block_sparse import block_sparse_attention\n"
        "q = torch.randn(1, 8, 1, 16); sel = torch.zeros(1, 1, 2, 1, dtype=torch.long)\n"
        "block_sparse_attention(q, q, q, sel, block_size=4)\n"
        "try:\n    block_sparse_attention(q, q, q, sel, block_size=4, impl='triton')\n"
        "except RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("q_block_size", [None, 1])
def test_torch_path_takes_non_contiguous_inputs(q_block_size):
    """q, k, v as transposed views ([B, H, T, hd] memory, as a model's projections may give them): the same
    output and gradients as naive."""
    case = (2, 4, 2, 48, 8, 8, q_block_size, 3, 1, True, False, False)  # T a multiple of the block: no padding copy
    qkv, sel, kw = make_case(case, torch.float32)
    qkv = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv]
    assert not qkv[1].is_contiguous()
    dout = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    ref, ref_grads = attention_and_grads([t.double() for t in qkv], sel, kw, "naive", dout)
    out, grads = attention_and_grads(qkv, sel, kw, "torch", dout)
    check("block_sparse_attention", "torch", torch.float32, "out (non-contiguous)", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        check("block_sparse_attention", "torch", torch.float32, f"{name} (non-contiguous)", a, b)
