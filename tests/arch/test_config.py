"""Config validation: every bad input fails at build time, naming the key path and the allowed values."""

import pytest
import torch

import arch
from arch import ConfigError
from arch.config import parse_layer_selector

BASE = {"d_model": 32, "n_layers": 4, "n_heads": 4, "max_seq_len": 16}


def cfg(**kw):
    return {**BASE, **kw}


@pytest.mark.parametrize(
    "bad, fragments",
    [
        (cfg(dmodel=3), ["model.dmodel", "unknown key", "d_model", "n_heads"]),
        (cfg(mixer="nope"), ["model.mixer.type", "unknown mixer 'nope'", "dense"]),
        (cfg(ffn={"type": "mlp", "actvation": "gelu"}), ["model.ffn.actvation", "activation", "d_ff"]),
        (cfg(ffn={"type": "mlp", "activation": "relu"}), ["model.ffn.activation", "'relu'", "'swiglu'", "'gelu'"]),
        (cfg(proj="conv"), ["model.proj.type", "linear"]),
        (cfg(norm="batchnorm"), ["model.norm.type", "rmsnorm", "layernorm_np"]),
        (cfg(n_heads=5), ["model.d_model", "not divisible", "n_heads=5"]),
        (cfg(n_kv_heads=3), ["model.n_kv_heads", "must divide"]),
        (cfg(d_model=0), ["model.d_model", ">= 1"]),
        (cfg(n_layers="four"), ["model.n_layers", "expected int"]),
        (cfg(rope_fraction=0.3), ["model.rope_fraction", "even"]),
        ({"d_model": 32, "n_layers": 2, "n_heads": 2}, ["model.max_seq_len", "required"]),
        (cfg(kind="cnn"), ["model.kind", "unknown model kind 'cnn'", "lm"]),
        (cfg(layers={"9": {"mixer": "dense"}}), ["model.layers.9", "out of range", "0-3"]),
        (cfg(layers={"a-b": {"mixer": "dense"}}), ["model.layers.a-b", "bad layer selector"]),
        (cfg(layers={"0-1": {"attention": "dense"}}), ["model.layers.0-1.attention", "mixer, ffn, proj"]),
        (cfg(layers={"0-1": {"mixer": {"type": "dense", "foo": 1}}}), ["model.layers.0-1.mixer.foo", "attn_backend"]),
        (cfg(mixer={"attn_backend": "sdpa"}), ["model.mixer.type", "required"]),
    ],
)
def test_bad_model_config_names_key_and_allowed(bad, fragments):
    with pytest.raises(ConfigError) as e:
        arch.build_model(bad)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_layer_selectors():
    assert parse_layer_selector("0-3", 12, "p") == [0, 1, 2, 3]
    assert parse_layer_selector("0-11:4", 12, "p") == [0, 4, 8]
    assert parse_layer_selector("1,5,7-8", 12, "p") == [1, 5, 7, 8]
    assert parse_layer_selector("*", 3, "p") == [0, 1, 2]


@pytest.fixture
def identity_ffn():
    """A second FFN type, registered for one test only."""
    from torch import nn

    @arch.FFNS.register("test_identity")
    class Identity(nn.Module):
        def __init__(self, ctx, *, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return x * self.scale

    yield Identity
    arch.FFNS._classes.pop("test_identity")


def test_per_layer_overrides_merge_or_replace(identity_ffn):
    model = arch.build_model(
        cfg(
            ffn={"type": "mlp", "activation": "gelu", "d_ff": 48},
            layers={
                "0-1": {"ffn": {"d_ff": 64}},
                "3": {"ffn": {"type": "test_identity", "scale": 2}},
                "1": {"ffn": {"activation": "swiglu"}},
            },
        )
    )
    rows = model.layer_table()
    # same type (or no type): options merge over the base's
    assert [r["ffn"].get("d_ff") for r in rows[:3]] == [64, 64, 48]
    assert [r["ffn"]["activation"] for r in rows[:3]] == ["gelu", "swiglu", "gelu"]
    assert model.blocks[0].ffn.w1.out_features == 64 and model.blocks[2].ffn.w1.out_features == 48
    assert model.blocks[1].ffn.w3 is not None and model.blocks[0].ffn.w3 is None
    # another type: replaces the block, the old type's options do not carry over
    assert rows[3]["ffn"] == {"type": "test_identity", "scale": 2.0}
    assert isinstance(model.blocks[3].ffn, identity_ffn)


def test_xformers_backend_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="xformers.*not installed"):
        arch.build_model(cfg(mixer={"type": "dense", "attn_backend": "xformers"}))


def test_registry_rejects_duplicate_names_and_new_block_is_one_class():
    from torch import nn

    reg = arch.Registry("thing")

    @reg.register("a")
    class A(nn.Module):
        def __init__(self, ctx, *, width: int = 3):
            super().__init__()

    with pytest.raises(KeyError):
        reg.register("a")(A)
    assert reg.build_spec("a", "x") == {"type": "a", "width": 3}
    with pytest.raises(ConfigError, match="x.width: expected int"):
        reg.build_spec({"type": "a", "width": 2.5}, "x")


def test_build_model_accepts_dictconfig_and_meta_device():
    from omegaconf import OmegaConf

    with torch.device("meta"):
        m = arch.build_model(OmegaConf.create(cfg(n_kv_heads=2)))
    assert next(m.parameters()).is_meta
