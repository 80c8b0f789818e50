"""DHSA: limit cases, causality (selections included), decoding, selection (causal and prefill, every chunker and
query representation) against a per-block transcription of the rule, the boundary predictor against a
window-by-window transcription, shared boundaries and predictors, chunkers, and config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import arch
from arch import build_model
from arch.dhsa import DHSA, BoundaryPredictor, chunk_table
from tests.conftest import assert_causal

SMALL = {"query_block": 8, "n_init": 4, "n_recent": 8, "max_chunk": 16, "chunk_size": 5}


def lm(mixer, T=70, kv=2, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = {"d_model": 32, "n_layers": layers, "n_heads": 4, "n_kv_heads": kv, "max_seq_len": T, "mixer": mixer}
    return build_model(cfg).eval()


def swapped(dense, **mixer):
    """The dense model's weights in a DHSA model (what `model.mixer.type=dhsa` does to a checkpoint)."""
    m = lm(
        {"type": "dhsa", **SMALL, **mixer},
        T=dense.max_seq_len,
        kv=dense.blocks[0].mixer.n_kv_heads,
        layers=len(dense.blocks),
    )
    m.load_state_dict(dense.state_dict())  # strict: the learned chunker keeps its own predictor weights
    return m


@pytest.mark.parametrize("mode", ["causal", "prefill"])
@pytest.mark.parametrize("chunker", ["similarity", "learned", "fixed"])
def test_budget_covering_the_context_is_dense_attention(mode, chunker):
    T = 45  # not a multiple of the query block or the chunk size
    dense = lm("dense", T=T)
    m = swapped(dense, budget=T, mode=mode, chunker=chunker)
    x = torch.randint(0, 256, (2, T))
    torch.testing.assert_close(m(x), dense(x), rtol=1e-5, atol=1e-5)
    if mode == "causal":  # and every gradient (prefill is inference only)
        m.train(), dense.train()
        g = torch.randn(2, T, 256)
        params = dict(m.named_parameters())
        names = [n for n, _ in dense.named_parameters()]  # the learned chunker's predictor gets no gradient
        for a, b in zip(
            torch.autograd.grad(m(x), [params[n] for n in names], g),
            torch.autograd.grad(dense(x), list(dense.parameters()), g),
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunker", ["similarity", "fixed", "learned"])
def test_causal_mode_is_causal_including_selection(chunker):
    T = 70
    m = swapped(lm("dense", T=T), budget=20, chunker=chunker, threshold=-1.0 if chunker == "learned" else None)
    assert_causal(m, T=T, positions=(0, 9, 31, 47, 60))
    # the selection itself: query blocks starting at or before t select the same keys when q, k after t change
    mixer = m.blocks[0].mixer
    q, k = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8)
    base = mixer.select(q, k)
    for t in (17, 40):
        q2, k2 = q.clone(), k.clone()
        q2[:, t + 1 :], k2[:, t + 1 :] = torch.randn_like(q2[:, t + 1 :]), torch.randn_like(k2[:, t + 1 :])
        other = mixer.select(q2, k2)
        nb = t // 8 + 1  # blocks starting at or before t
        S = min(base.shape[-1], other.shape[-1])
        assert torch.equal(base[:, :nb, :S], other[:, :nb, :S])
        assert (base[:, :nb, S:] == -1).all() and (other[:, :nb, S:] == -1).all()


def test_prefill_mode_sees_later_positions_and_refuses_training():
    T = 70
    m = swapped(lm("dense", T=T), budget=20, mode="prefill")
    mixer = m.blocks[0].mixer
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, 4, 8, generator=g), torch.randn(1, T, 2, 8, generator=g)
    base, changed = mixer.select(q, k), 0
    for t in range(24, 60, 8):  # perturb the queries after the first position of a block
        q2 = q.clone()
        q2[:, t + 1 :] = torch.randn(q2[:, t + 1 :].shape, generator=g)
        changed += not torch.equal(mixer.select(q2, k)[:, t // 8], base[:, t // 8])
    assert changed  # the block's selection depends on its later queries: inference only
    m.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        m(torch.randint(0, 256, (1, T)))


@pytest.mark.parametrize("chunker,B", [("similarity", 1), ("fixed", 2), ("learned", 1)])
def test_decoding_token_by_token_equals_the_whole_sequence(chunker, B):
    T = 70
    m = swapped(lm("dense", T=T), budget=24, chunker=chunker, threshold=-0.5 if chunker == "learned" else None)
    x = torch.randint(0, 256, (B, T))
    cache = m.new_cache()
    steps = torch.cat([m.step(x[:, i : i + 1], cache) for i in range(T)], dim=1)
    torch.testing.assert_close(steps, m(x), rtol=1e-5, atol=1e-5)
    assert len(cache[0]["chunk_start"]) > 3  # several chunks were closed while decoding


def test_dense_decoding_equals_the_whole_sequence():
    m = lm("dense", T=33)
    x = torch.randint(0, 256, (2, 33))
    cache = m.new_cache()
    steps = torch.cat([m.step(x[:, i : i + 1], cache) for i in range(33)], dim=1)
    torch.testing.assert_close(steps, m(x), rtol=1e-5, atol=1e-5)


def reference_selection(mixer: DHSA, q, k):
    """A per-block transcription of the rule, batch 0 -> list (per query block) of sets of key positions.

    Chunks from ``chunk_starts``. Causal mode: candidates = closed chunks (end + lookahead <= block start),
    query = √n · mean of the n = query_block head-averaged queries ending at the block start; forced = initial
    tokens, the n_recent before the block, the block, the tokens after the last closed chunk. Prefill mode:
    candidates = all chunks; query = √n · mean of the block's own queries (``query_rep: block``) or the mean
    over the block's positions of their chunks' √|C|-scaled mean queries (``chunks``); forced = initial tokens,
    the n_recent before the block, the block. Then whole chunks in decreasing query · K_c (√|C|-scaled mean of
    the head-averaged keys), the one crossing the budget contributing its most recent candidate tokens."""
    T, qb = q.shape[1], mixer.query_block
    starts = mixer.chunk_starts(k.flatten(2))[0].tolist()
    bounds = [p for p in range(T) if starts[p]] + [T]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    qm, km = q[0].double().mean(1), k[0].double().mean(1)  # [T, hd]
    rep = lambda x, s, e: x[s:e].mean(0) * math.sqrt(e - s)  # noqa: E731
    out = []
    for i0 in range(0, T, qb):
        i1 = i0 + qb  # the budget counts the whole block, also past the end of the sequence
        rstart = max(i0 - mixer.n_recent, 0)
        if mixer.mode == "causal":
            cands = [(s, e) for s, e in chunks if e + mixer.lookahead <= i0]
            rstart = min(rstart, cands[-1][1]) if cands else 0
            qrep = rep(qm, max(i0 + 1 - qb, 0), i0 + 1)
        else:
            cands = chunks
            if mixer.query_rep == "block":
                qrep = rep(qm, i0, min(i1, T))
            else:
                own = [next((s, e) for s, e in chunks if s <= t < e) for t in range(i0, min(i1, T))]
                qrep = torch.stack([rep(qm, s, e) for s, e in own]).mean(0)
        seen = set(range(min(mixer.n_init, i1))) | set(range(rstart, i1))
        scored = []
        for s, e in cands:
            cand = [j for j in range(max(s, mixer.n_init), min(e, rstart))]
            if cand:
                scored.append((float(qrep @ rep(km, s, e)), cand))
        left = max(mixer.budget - len([j for j in seen if j < i0]), 0)  # the budget: keys before the block
        for _, cand in sorted(scored, key=lambda sc: -sc[0]):
            take = cand[len(cand) - min(left, len(cand)) :]
            seen |= set(take)
            left -= len(take)
        out.append({j for j in seen if j < T})
    return out


@pytest.mark.parametrize(
    "mixer",
    [
        {"chunker": "similarity"},
        {"chunker": "fixed"},
        {"chunker": "learned", "threshold": -1.0},
        {"chunker": "similarity", "mode": "prefill"},  # query_rep: block (the released code's)
        {"chunker": "learned", "threshold": -1.0, "mode": "prefill"},
        {"chunker": "fixed", "mode": "prefill", "query_rep": "chunks"},
        {"chunker": "learned", "threshold": -1.0, "mode": "prefill", "query_rep": "chunks"},
    ],
    ids=str,
)
def test_selection_matches_the_per_block_rule(mixer):
    m = swapped(lm("dense", T=90, layers=1), budget=30, **mixer)
    sel_mixer = m.blocks[0].mixer
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 90, 4, 8, generator=g), torch.randn(1, 90, 2, 8, generator=g)
    sel = sel_mixer.select(q, k)[0]
    ref = reference_selection(sel_mixer, q, k)
    for b, want in enumerate(ref):
        got = sel[b][sel[b] >= 0].tolist()
        assert got == sorted(want), f"query block {b}"
        assert len(got) <= max(sel_mixer.budget, len(want))
    assert any(len(s) < (b + 1) * 8 for b, s in enumerate(ref))  # the selection is sparse somewhere
    if sel_mixer.chunker != "fixed":  # at this budget the chunker matters: fixed blocks select other keys
        fixed = swapped(lm("dense", T=90, layers=1), budget=30, **{**mixer, "chunker": "fixed", "threshold": None})
        assert not torch.equal(fixed.blocks[0].mixer.select(q, k), sel[None])


def test_prefill_query_representations_differ():
    """``block`` (the released code's) and ``chunks`` score query blocks differently, so they select differently."""
    m = {q: swapped(lm("dense", T=90, layers=1), budget=30, mode="prefill", query_rep=q) for q in ("block", "chunks")}
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 90, 4, 8, generator=g), torch.randn(1, 90, 2, 8, generator=g)
    assert not torch.equal(m["block"].blocks[0].mixer.select(q, k), m["chunks"].blocks[0].mixer.select(q, k))


@pytest.mark.parametrize("mode", ["causal", "prefill"])
def test_selection_in_groups_of_query_blocks_is_the_same(mode, monkeypatch):
    mixer = swapped(lm("dense", T=90, layers=1), budget=30, mode=mode).blocks[0].mixer
    q, k = torch.randn(2, 90, 4, 8), torch.randn(2, 90, 2, 8)
    whole = mixer.select(q, k)
    monkeypatch.setattr(arch.dhsa, "SELECT_ELEMENTS", 200)  # 2 query blocks per group
    assert torch.equal(mixer.select(q, k), whole)


def test_sparse_attention_matches_a_dense_masked_reference_with_gradients():
    T = 61
    m = swapped(lm("dense", T=T, layers=1), budget=20)
    mixer = m.blocks[0].mixer
    q = torch.randn(2, T, 4, 8, requires_grad=True)
    k = torch.randn(2, T, 2, 8, requires_grad=True)
    v = torch.randn(2, T, 2, 8, requires_grad=True)
    sel = mixer.select(q, k)  # [B, nb, S]
    mask = torch.zeros(2, T, T, dtype=torch.bool)
    for b in range(2):
        for i in range(T):
            keys = sel[b, i // 8]
            mask[b, i, keys[(keys >= 0) & (keys <= i)]] = True
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)
    out = mixer.attend(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the forward-only path of the core
        torch.testing.assert_close(mixer.attend(q, k, v), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert mask.sum() < 0.7 * T * (T + 1)  # sparse: fewer than 70% of the causal pairs of the 2 sequences


def test_chunkers():
    T = 60
    mixer = swapped(lm("dense", T=T, layers=1), budget=8, max_chunk=64).blocks[0].mixer
    # keys constant on [0, 20), [20, 45), [45, 60): similarity boundaries exactly at the changes
    k = torch.cat([torch.randn(1, 1, 16).expand(1, n, 16) for n in (20, 25, 15)], dim=1)
    starts = mixer.chunk_starts(k)[0]
    assert starts.nonzero().flatten().tolist() == [0, 20, 45]
    # noisy keys: NMS keeps boundaries more than nms_radius apart
    starts = mixer.chunk_starts(torch.randn(2, T, 16))
    for row in starts:
        gaps = row[1:].nonzero().flatten().diff()  # (0 always starts a chunk)
        assert (gaps > mixer.nms_radius).all() and len(gaps) >= 2
    fixed = swapped(lm("dense", T=T, layers=1), budget=8, chunker="fixed").blocks[0].mixer
    assert fixed.chunk_starts(torch.randn(2, T, 16))[0].nonzero().flatten().tolist() == list(range(0, T, 5))
    cid, s, e = chunk_table(torch.tensor([[True, False, True, False, False], [True, False, False, False, True]]))
    assert cid.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert s.tolist() == [[0, 2], [0, 4]] and e.tolist() == [[2, 5], [4, 5]]


def test_boundary_predictor_shapes_and_locality():
    bp = BoundaryPredictor(16, 2, window=4, hidden=8)
    k = torch.randn(2, 30, 16)
    logits = bp(k)
    assert logits.shape == (2, 30)
    torch.testing.assert_close(bp(k, 10, 14, span=3), logits[:, 10:14])  # spans and windows agree
    k2 = k.clone()
    k2[:, 20:] += 1.0  # the logit at p depends only on keys p-4 .. p+3
    torch.testing.assert_close(bp(k2)[:, :17], logits[:, :17])


def predictor_by_hand(bp: BoundaryPredictor, k: torch.Tensor) -> torch.Tensor:
    """The predictor's logit at each p, one window at a time: keys p-w .. p+w-1 (zeros outside), attention of
    n_heads heads with the module's projections, LayerNorm of attn (released) or of x + attn, mean of each half,
    features [l, r, |l-r|, l*r, cos], MLP. k [B, T, C] -> [B, T]."""
    B, T, C = k.shape
    w, h = bp.window, bp.n_heads
    Wi, bi, Wo, bo = bp.attn.in_proj_weight, bp.attn.in_proj_bias, bp.attn.out_proj.weight, bp.attn.out_proj.bias
    out = torch.empty(B, T)
    for b in range(B):
        for p in range(T):
            x = torch.stack([k[b, j] if 0 <= j < T else torch.zeros(C) for j in range(p - w, p + w)])  # [2w, C]
            qh, kh, vh = ((x @ Wi.T + bi).split(C, -1)[i].view(2 * w, h, C // h).transpose(0, 1) for i in range(3))
            a = ((qh @ kh.transpose(1, 2)) / math.sqrt(C // h)).softmax(-1) @ vh  # [h, 2w, C/h]
            a = a.transpose(0, 1).reshape(2 * w, C) @ Wo.T + bo
            z = F.layer_norm(x + a if bp.residual else a, (C,), bp.norm.weight, bp.norm.bias, bp.norm.eps)
            l, r = z[:w].mean(0), z[w:].mean(0)  # noqa: E741
            feats = torch.cat([l, r, (l - r).abs(), l * r, F.cosine_similarity(l, r, dim=0)[None]])
            out[b, p] = bp.mlp(feats)[0]
    return out


@pytest.mark.parametrize("residual", [False, True])  # False: the released LayerNorm(attn(x))
def test_boundary_predictor_matches_a_window_by_window_transcription(residual):
    torch.manual_seed(0)
    bp = BoundaryPredictor(16, 2, window=4, hidden=8, residual=residual)
    k = torch.randn(2, 30, 16)
    torch.testing.assert_close(bp(k), predictor_by_hand(bp, k), rtol=1e-5, atol=1e-5)


def test_share_boundaries_chunks_once_with_the_first_layer_keys(monkeypatch):
    T = 70
    dense = lm("dense", T=T, layers=3)
    shared = swapped(dense, budget=20, share_boundaries=True)
    calls = []
    real = DHSA.chunk_starts
    monkeypatch.setattr(DHSA, "chunk_starts", lambda self, k: calls.append(self) or real(self, k))
    x = torch.randint(0, 256, (2, T))
    out = shared(x)
    assert calls == [shared.blocks[0].mixer]  # chunked once, by layer 0
    # the same model without sharing, its layers 1-2 given layer 0's chunks by hand
    own = swapped(dense, budget=20)
    first = {}
    monkeypatch.setattr(DHSA, "chunk_starts", lambda self, k: first.setdefault("starts", real(own.blocks[0].mixer, k)))
    torch.testing.assert_close(own(x), out, rtol=0, atol=0)
    monkeypatch.setattr(DHSA, "chunk_starts", real)
    assert not torch.equal(own(x), out)  # at this budget, each layer's own chunks select other keys
    assert_causal(shared, T=T, positions=(0, 31, 60))
    with pytest.raises(NotImplementedError, match="share_boundaries"):
        shared.step(x[:, :1], shared.new_cache())


def test_shared_predictor_file_and_residual_metadata(tmp_path):
    from safetensors.torch import save_file

    bp = BoundaryPredictor(16, 2, window=4, hidden=8, residual=False)
    meta = {"dim": "16", "n_heads": "2", "window": "4", "hidden": "8", "residual": "0"}
    path = tmp_path / "shared.safetensors"
    save_file({f"shared.{n}": t.contiguous() for n, t in bp.state_dict().items()}, str(path), metadata=meta)
    spec = {"type": "dhsa", "chunker": "learned", "predictor": str(path), "predictor_hidden": 8}
    m = lm({**spec, "shared_predictor": True, "predictor_residual": False}, layers=2)
    for block in m.blocks:
        assert not block.mixer.boundary.residual
        for n, t in bp.state_dict().items():
            assert torch.equal(block.mixer.boundary.state_dict()[n], t)
    with pytest.raises(arch.ConfigError, match="'residual': 0.*'residual': 1"):
        lm({**spec, "shared_predictor": True}, layers=2)  # a file of released-style predictors, with a residual
    with pytest.raises(arch.ConfigError, match="no layers.0 predictor; it holds \\['shared'\\]"):
        lm({**spec, "predictor_residual": False}, layers=2)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"budget": 0}, "budget"),
        ({"query_block": 0}, "query_block"),
        ({"chunker": "kmeans"}, "chunker"),
        ({"predictor": "x.safetensors"}, "predictor"),
        ({"mode": "decode"}, "mode"),
        ({"query_rep": "chunks"}, "query_rep: 'chunks' averages over later positions; it needs mode 'prefill'"),
        ({"predictor_residual": False}, "predictor_residual is only used by chunker 'learned'"),
        ({"shared_predictor": True}, "shared_predictor is only used by chunker 'learned'"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(arch.ConfigError, match=match):
        lm({"type": "dhsa", **bad})


def test_missing_predictor_file_is_a_config_error(tmp_path):
    with pytest.raises(arch.ConfigError, match="dhsa-boundaries"):
        lm({"type": "dhsa", "chunker": "learned", "predictor": str(tmp_path / "none.safetensors")})


@pytest.mark.parametrize("mixer", ["dense", "dhsa", "bra"])
def test_sampling_with_the_decoding_cache_gives_the_same_tokens(mixer):
    from train.generate import generate

    spec = {
        "dense": "dense",
        "bra": {"type": "bra", "region_size": 8, "topk": 1},  # bra: no step, re-runs
        "dhsa": {"type": "dhsa", **SMALL, "budget": 12},
    }[mixer]
    m = lm(spec, T=40)
    prompt = torch.randint(0, 256, (5,)).tolist()
    fast = generate(m, prompt, 50, temperature=1.0, seed=1)  # crosses max_seq_len: the cache is dropped at 40
    slow = generate(m, prompt, 50, temperature=1.0, seed=1, incremental=False)
    assert fast == slow and len(fast) == 55
