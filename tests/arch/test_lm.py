"""The causal LM: causality, RoPE's relative-position property, GQA, export round-trip."""

import pytest
import torch

import arch
from arch.attention import causal_attention
from arch.rope import RotaryEmbedding

from ..conftest import assert_causal

VARIANTS = {
    "swiglu-rms": {},
    "gelu-layernorm-untied": {
        "ffn": {"type": "mlp", "activation": "gelu"},
        "norm": "layernorm",
        "tie_embeddings": False,
    },
    "gqa-partial-rope-np-ln": {"n_kv_heads": 1, "rope_fraction": 0.25, "norm": "layernorm_np"},
    "mixed-layers": {"layers": {"1": {"ffn": {"type": "mlp", "activation": "gelu", "d_ff": 40}}}},
    "bra": {"mixer": {"type": "bra", "region_size": 4, "topk": 2}},
    "bra-per-query": {"mixer": {"type": "bra", "region_size": 4, "topk": 2, "query_block": 1}},
    "bra-gqa-first-qblock": {
        "n_kv_heads": 2,
        "mixer": {"type": "bra", "region_size": 4, "topk": 1, "attend_first": True, "query_block": 2},
    },
}


def make(**kw):
    torch.manual_seed(0)
    return arch.build_model({"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 24, **kw}).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causal_invariant(variant, mode):
    """Perturbing tokens after position t changes no logit at or before t."""
    model = make(**VARIANTS[variant]).train(mode == "train")
    assert_causal(model)


def test_attention_matches_explicit_softmax_with_gqa():
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, hd = 2, 13, 6, 2, 8
    q, k, v = (torch.randn(B, T, h, hd, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    out = causal_attention(q, k, v, "sdpa")
    kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) / hd**0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", s.softmax(-1), vv)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_scores_depend_only_on_relative_position(fraction):
    rope = RotaryEmbedding(16, 64, fraction=fraction).double()
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64),
    )
    score = lambda i, j: (rope(q, offset=i) * rope(k, offset=j)).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        rope(q, offset=64)


def test_tied_and_untied_heads():
    tied = make()
    assert tied.head.weight is tied.tok_emb.weight
    untied = make(tie_embeddings=False)
    assert untied.head.weight is not untied.tok_emb.weight


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="max_seq_len is 24"):
        make()(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("variant", ["swiglu-rms", "gelu-layernorm-untied", "mixed-layers"])
def test_safetensors_export_roundtrip_is_exact(tmp_path, variant):
    model = make(**VARIANTS[variant])
    x = torch.randint(0, 256, (2, 20))
    arch.save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = arch.load_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded.config == model.config


def test_load_pretrained_rejects_corrupt_file(tmp_path):
    arch.save_pretrained(make(), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        arch.load_pretrained(tmp_path / "m")
