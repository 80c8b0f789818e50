"""TokenFormer: Pattention against a plain transcription of Eq. 5, growth exact to rounding wherever a config places
Pattention, the paper configs' shapes."""

import copy
import math

import pytest
import torch

import arch
from arch.pattention import Pattention

from ..conftest import CONFIGS, assert_causal


def pattention_by_formula(x, K, V, tau):
    """Row by row, straight from the paper: S = GeLU(τ · A / ‖A‖₂), A = X Kᵀ, out = S V."""
    rows = []
    for xi in x.reshape(-1, x.shape[-1]):
        a = (K * xi).sum(-1)  # [n]
        z = tau * a / torch.sqrt((a * a).sum())
        s = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # exact GeLU
        rows.append((s[:, None] * V).sum(0))
    return torch.stack(rows).reshape(*x.shape[:-1], V.shape[-1])


@pytest.mark.parametrize("shape, d_in, d_out, n", [((2, 7), 5, 3, 11), ((13,), 8, 8, 4), ((1, 3, 2), 6, 9, 17)])
def test_pattention_matches_formula_forward_and_gradients(shape, d_in, d_out, n):
    torch.manual_seed(0)
    p = Pattention(d_in, d_out, n, value_std=0.5).double()
    x = torch.randn(*shape, d_in, dtype=torch.float64, requires_grad=True)
    out = p(x)
    assert float(p.tau) == pytest.approx(math.sqrt(n))  # τ = √n at construction
    ref = pattention_by_formula(x, p.key, p.value, p.tau)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, p.key, p.value), g)
    ref_grads = torch.autograd.grad(ref, (x, p.key, p.value), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, k, v: arch.pattention.pattention(x, k, v, p.tau), (x, p.key, p.value))


def test_zero_rows_give_zero_output_and_finite_gradients():
    p = Pattention(4, 3, 6, value_std=1.0)
    x = torch.zeros(2, 4, requires_grad=True)
    out = p(x)
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, p.key, p.value))


def test_init_follows_reference_code():
    torch.manual_seed(0)
    L, d = 6, 256
    m = arch.build_model(
        {"d_model": d, "n_layers": L, "n_heads": 4, "max_seq_len": 8, "proj": "pattention", "ffn": "pattention"}
    )
    ffn = m.blocks[0].ffn
    assert ffn.key.shape == (4 * d, d) and m.blocks[0].mixer.q.key.shape == (d, d)  # default slots: d, 4d
    assert ffn.key.std().item() == pytest.approx(0.02, rel=0.05)
    assert ffn.value.std().item() == pytest.approx(2 / (L * math.sqrt(d)), rel=0.05)
    assert float(ffn.tau) == pytest.approx(math.sqrt(4 * d))


TF = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "max_seq_len": 24,
    "norm": "layernorm_np",
    "final_norm": "layernorm",
    "proj": {"type": "pattention", "qkv_tokens": 12, "proj_tokens": 20},
    "ffn": {"type": "pattention", "n_tokens": 40},
    "rope_fraction": 0.25,
}


def tokenformer(**kw):
    torch.manual_seed(0)
    return arch.build_model({**TF, **kw})


@pytest.mark.parametrize(
    "kw, expect",
    [
        ({"scale": 2}, {"qkv": 24, "proj": 40, "ffn": 80}),
        ({"scale": 2.5}, {"qkv": 30, "proj": 50, "ffn": 100}),
        ({"slots": {"qkv": 13}}, {"qkv": 13, "proj": 20, "ffn": 40}),
        ({"slots": {"proj": 64}}, {"qkv": 12, "proj": 64, "ffn": 40}),
        ({"slots": {"ffn": 41}}, {"qkv": 12, "proj": 20, "ffn": 41}),
    ],
)
def test_growth_is_exact_for_every_role(kw, expect):
    model = tokenformer().eval()
    x = torch.randint(0, 256, (3, 24))
    grown = arch.grow(model, **kw).eval()
    counts = {}
    for m in grown.modules():
        if isinstance(m, Pattention):
            counts.setdefault(m.role, set()).add(m.n_tokens)
    assert counts == {r: {n} for r, n in expect.items()}
    assert (grown(x) - model(x)).abs().max().item() <= 1e-6
    assert grown.config["ffn"]["n_tokens"] == expect["ffn"] and grown.config["proj"]["qkv_tokens"] == expect["qkv"]
    taus = [float(m.tau) for m in grown.modules() if isinstance(m, Pattention)]
    assert taus == [float(m.tau) for m in model.modules() if isinstance(m, Pattention)]  # τ is not re-derived


def test_growth_respects_per_layer_overrides_and_roundtrips(tmp_path):
    model = tokenformer(layers={"1": {"ffn": {"n_tokens": 8}}}).eval()
    grown = arch.grow(model, scale=3).eval()
    assert grown.blocks[0].ffn.n_tokens == 120 and grown.blocks[1].ffn.n_tokens == 24
    arch.save_pretrained(grown, tmp_path / "g")
    loaded = arch.load_pretrained(tmp_path / "g").eval()
    x = torch.randint(0, 256, (2, 24))
    assert torch.equal(loaded(x), grown(x))


def trained(model, steps=6, lr=0.1, seed=0):
    """``model`` after a few AdamW steps on random tokens: weights of trained scale, not of the init."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, model.max_seq_len), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_tokenformer():
    return trained(tokenformer(d_model=128, max_seq_len=32, proj="pattention", ffn="pattention"))


@pytest.mark.parametrize("dtype, rel_tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_growth_is_exact_to_rounding_on_trained_weights(trained_tokenformer, dtype, rel_tol):
    """Zero new keys give GeLU(0) = 0 exactly; only the summation order of the wider matmuls changes. On a
    2-core CPU the logits moved by less than 1e-6 (float32) and 2e-15 (float64) relative to their largest value
    (run with -s to see the figures)."""
    model = copy.deepcopy(trained_tokenformer).to(dtype)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    ffn = model.blocks[0].ffn  # well beyond the init: keys std 0.02, values std 2 / (L sqrt(d)) = 0.088
    assert rms(ffn.key) > 5 * 0.02 and rms(ffn.value) > 1.5 * 0.088, (rms(ffn.key), rms(ffn.value))
    x = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        base = model(x)
        for scale in (1.3, 2, 2.5):
            drift = (arch.grow(model, scale=scale).eval()(x) - base).abs().max() / base.abs().max()
            print(f"growth x{scale} {dtype}: max |logit change| / max |logit| = {drift.item():.1e}")
            assert drift <= rel_tol


D = 32  # the width of tokenformer(): default slots are D (qkv, proj) and 4 D (ffn)


@pytest.mark.parametrize(
    "kw, expect",
    [  # expect: per layer, the grown (qkv, proj, ffn) token counts; None = not a Pattention
        ({}, [(24, 40, 80), (24, 40, 80)]),  # base blocks
        (
            {"proj": "linear", "ffn": "mlp", "layers": {"1": {"ffn": {"type": "pattention"}}}},
            [None, (None, None, 8 * D)],
        ),
        (
            {"proj": "linear", "ffn": "mlp", "layers": {"0": {"ffn": {"type": "pattention", "n_tokens": 24}}}},
            [(None, None, 48), None],
        ),
        (
            {"proj": "linear", "ffn": "mlp", "layers": {"1": {"proj": {"type": "pattention", "proj_tokens": 10}}}},
            [None, (2 * D, 20, None)],
        ),
        (
            {
                "n_layers": 4,
                "layers": {
                    "0-1": {"ffn": "mlp"},
                    "1": {"ffn": {"type": "pattention"}},  # replaces an MLP: default count
                    "2": {"ffn": {"n_tokens": 8}},  # updates the base Pattention
                    "3": {"proj": "linear", "ffn": {"type": "pattention"}},  # same type: inherits 40
                },
            },
            [(24, 40, None), (24, 40, 8 * D), (24, 40, 16), (None, None, 80)],
        ),
    ],
    ids=["base", "override-ffn", "override-ffn-n_tokens", "override-proj", "mixed"],
)
def test_growth_works_for_every_placement_of_pattention(kw, expect):
    model = tokenformer(**kw).double().eval()
    grown = arch.grow(model, scale=2).eval()
    for block, want in zip(grown.blocks, expect):
        mixer, ffn = block.mixer, block.ffn
        got = (
            mixer.q.n_tokens if isinstance(mixer.q, Pattention) else None,
            mixer.o.n_tokens if isinstance(mixer.o, Pattention) else None,
            ffn.n_tokens if isinstance(ffn, Pattention) else None,
        )
        assert got == (want or (None, None, None))
    rebuilt = arch.build_model(grown.config).double().eval()  # the grown config describes the grown model
    rebuilt.load_state_dict(grown.state_dict(), strict=True)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), grown(x))
        torch.testing.assert_close(grown(x), model(x), rtol=1e-12, atol=1e-12)


def test_growth_rejects_an_override_that_both_adds_and_updates_pattentions():
    model = tokenformer(n_layers=3, layers={"0-1": {"ffn": "mlp"}, "1-2": {"ffn": {"type": "pattention"}}})
    with pytest.raises(arch.ConfigError, match="model.layers.1-2.ffn makes some of its layers a Pattention"):
        arch.grow(model, scale=2)


def test_new_tokens_learn_after_growth():
    """New keys are zero, so at the first step the new scores are GeLU(0) = 0: new keys get gradient at once,
    new values from the second step on (their gradient is Sᵀ dout with S_new = 0 until the keys have moved)."""
    grown = arch.grow(tokenformer(), scale=2)
    ffn = grown.blocks[0].ffn
    n_old = int(ffn.n_old)
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 256, (4, 24))
    before = {k: v.detach().clone() for k, v in (("key", ffn.key), ("value", ffn.value))}
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(grown(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        if step == 0:
            assert ffn.key.grad[n_old:].abs().sum() > 0
            assert ffn.value.grad[n_old:].abs().sum() == 0  # S_new = GeLU(0) = 0 exactly
        else:
            assert ffn.value.grad[n_old:].abs().sum() > 0
        opt.step()
    assert not torch.equal(ffn.key[n_old:], before["key"][n_old:])
    assert not torch.equal(ffn.value[n_old:], before["value"][n_old:])


def test_growth_errors():
    with pytest.raises(arch.ConfigError, match="scale must be >= 1"):
        arch.grow(tokenformer(), scale=0.5)
    with pytest.raises(arch.ConfigError, match="unknown roles.*allowed: qkv, proj, ffn"):
        arch.grow(tokenformer(), slots={"mlp": 3})
    with pytest.raises(arch.ConfigError, match="no Pattention"):
        arch.grow(arch.build_model({"d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 8}))
    with pytest.raises(ValueError, match="cannot shrink"):
        arch.grow(tokenformer(), slots={"qkv": 2})


def test_tokenformer_lm_is_causal():
    assert_causal(tokenformer().eval())


@pytest.mark.parametrize(
    "name, n_layers, d, n_heads, nominal",
    [
        ("150m", 12, 768, 12, 150e6),
        ("450m", 24, 1024, 16, 450e6),
        ("900m", 32, 1280, 16, 900e6),
        ("1.5b", 40, 1536, 16, 1.5e9),
    ],
)
def test_paper_configs_have_the_released_shapes(name, n_layers, d, n_heads, nominal):
    """Depth, width, heads (head dims 64, 64, 80, 96) and parameter tokens (Q/K/V/output: d, FFN: 4d) of the released
    configs (configs/tokenformer/*_train_pile.yml); the parameter count from those shapes, exactly."""
    from train.config import load_config

    cfg = load_config(CONFIGS / f"paper/tokenformer-{name}.yaml")
    with torch.device("meta"):
        model = arch.build_model(cfg["model"])
    assert len(model.blocks) == n_layers and model.tok_emb.weight.shape == (50432, d)
    for block in model.blocks:
        m = block.mixer
        assert (m.n_heads, m.n_kv_heads, m.head_dim, m.rope.rot_dim) == (
            n_heads,
            n_heads,
            d // n_heads,
            d // n_heads // 4,
        )
        for proj, n_tokens in ((m.q, d), (m.k, d), (m.v, d), (m.o, d), (block.ffn, 4 * d)):
            assert isinstance(proj, Pattention) and proj.key.shape == proj.value.shape == (n_tokens, d)
        assert not list(block.norm1.parameters()) and not list(block.norm2.parameters())  # non-parametric LN
    n = sum(p.numel() for p in model.parameters())
    # tied embedding, per layer 4 Pattentions of d key + d value tokens of width d and one of 4d, final LayerNorm
    assert n == 50432 * d + n_layers * (4 * 2 * d * d + 2 * 4 * d * d) + 2 * d
    assert abs(n / nominal - 1) <= 0.06, n  # the paper's nominal size


def with_norm(norm: str, impl: str = "auto") -> dict:
    return {
        "proj": {"type": "pattention", "qkv_tokens": 12, "proj_tokens": 20, "norm": norm, "impl": impl},
        "ffn": {"type": "pattention", "n_tokens": 40, "norm": norm, "impl": impl},
    }


@pytest.mark.parametrize("norm", ["l2_gelu", "l1_gelu"])
def test_growth_is_exact_under_l2_and_l1_norms(norm):
    model = tokenformer(**with_norm(norm)).eval()
    assert model.blocks[0].ffn.norm == norm
    assert float(model.blocks[0].ffn.tau) == pytest.approx(math.sqrt(40) if norm == "l2_gelu" else 40)
    x = torch.randint(0, 256, (3, 24))
    grown = arch.grow(model, scale=2).eval()
    assert grown.blocks[0].ffn.n_tokens == 80
    assert (grown(x) - model(x)).abs().max().item() <= 1e-6


def test_softmax_norm_refuses_to_grow():
    model = tokenformer(**with_norm("softmax"))
    x = torch.randint(0, 256, (2, 24))
    assert torch.isfinite(model(x)).all()
    with pytest.raises(arch.ConfigError, match="cannot grow a Pattention with norm 'softmax'"):
        arch.grow(model, scale=2)


def test_pattention_impl_is_a_checked_config_key():
    model = tokenformer(**with_norm("l2_gelu", impl="naive"))
    assert {m.impl for m in model.modules() if isinstance(m, Pattention)} == {"naive"}
    with pytest.raises(arch.ConfigError, match="impl"):
        tokenformer(**with_norm("l2_gelu", impl="cuda"))
