"""BiFormer backbones: the paper configs are the released architectures (exact parameter counts, heads, widths,
depths), and a released checkpoint converts, strict-loads and gives the logits of an independent functional
forward of the released model (written here from the released module tree: models/biformer.py, _common.py,
ops/bra_legacy.py)."""

import pytest
import torch
import torch.nn.functional as F

import arch
from arch.biformer import convert_official_state_dict
from arch.bra import AttentionLePE, BiLevelRoutingAttention

from ..conftest import CONFIGS
from .reference_bra import reference_bra

# name -> (released parameter count at 1000 classes, depths, dims, stage-4 head dim)
RELEASED = {
    "t": (13_142_760, [2, 2, 8, 2], [64, 128, 256, 512], 64),
    "s": (25_536_232, [4, 4, 18, 4], [64, 128, 256, 512], 64),
    "b": (56_804_968, [4, 4, 18, 4], [96, 192, 384, 768], 96),
}


def paper_model(name: str):
    from train.config import load_config

    cfg = load_config(CONFIGS / f"paper/biformer-{name}.yaml")
    with torch.device("meta"):
        return arch.build_model(cfg["model"])


def released_state_dict(depths, dims, num_classes=1000, in_chans=3, mlp_ratio=3, gen=None, device="cpu"):
    """A state dict named and shaped as the released BiFormer's (random values; BatchNorm statistics included)."""
    sd = {}

    def rand(*shape, std=1.0, shift=0.0):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std + shift

    def conv(name, c_out, c_in, k):  # c_in per group
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(c_out, c_in, k, k, std=(c_in * k * k) ** -0.5), rand(c_out)

    def linear(name, d_out, d_in, bias=True):
        sd[f"{name}.weight"] = rand(d_out, d_in, std=d_in**-0.5)
        if bias:
            sd[f"{name}.bias"] = rand(d_out, std=0.1)

    def norm(name, c, batch=False):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(c, std=0.1, shift=1.0), rand(c, std=0.1)
        if batch:
            sd[f"{name}.running_mean"], sd[f"{name}.running_var"] = rand(c, std=0.1), rand(c, std=0.1, shift=1.0).abs()
            sd[f"{name}.num_batches_tracked"] = torch.tensor(7, device=device)

    d = dims
    conv("downsample_layers.0.0", d[0] // 2, in_chans, 3)  # stem: conv, BN, GELU, conv, BN
    norm("downsample_layers.0.1", d[0] // 2, batch=True)
    conv("downsample_layers.0.3", d[0], d[0] // 2, 3)
    norm("downsample_layers.0.4", d[0], batch=True)
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0", d[i], d[i - 1], 3)
        norm(f"downsample_layers.{i}.1", d[i], batch=True)
    for s, depth in enumerate(depths):
        for b in range(depth):
            p, c = f"stages.{s}.{b}.", d[s]
            conv(p + "pos_embed", c, 1, 3)
            norm(p + "norm1", c)
            if s < 3:  # BiLevelRoutingAttention: QKVLinear (with bias), lepe on V, wo
                linear(p + "attn.qkv.qkv", 3 * c, c)
                conv(p + "attn.lepe", c, 1, 5)
                linear(p + "attn.wo", c, c)
            else:  # AttentionLePE: qkv without bias, proj, lepe on x
                linear(p + "attn.qkv", 3 * c, c, bias=False)
                linear(p + "attn.proj", c, c)
                conv(p + "attn.lepe", c, 1, 5)
            norm(p + "norm2", c)
            linear(p + "mlp.0", mlp_ratio * c, c)  # mlp = Sequential(Linear, Identity, GELU, Linear)
            linear(p + "mlp.3", c, mlp_ratio * c)
    norm("norm", d[3], batch=True)
    linear("head", num_classes, d[3])
    return sd


def released_forward(sd, images, depths, topks, n_win, head_dim=32, stage4_heads=8):
    """The released BiFormer's eval-mode forward, written functionally on a released-format state dict."""

    def bn(x, name):
        w = [sd[f"{name}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(x, *w, training=False, eps=1e-5)

    def conv(x, name, **kw):
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    x = images
    x = bn(conv(x, "downsample_layers.0.0", stride=2, padding=1), "downsample_layers.0.1")
    x = bn(conv(F.gelu(x), "downsample_layers.0.3", stride=2, padding=1), "downsample_layers.0.4")
    for s, depth in enumerate(depths):
        if s:
            x = bn(conv(x, f"downsample_layers.{s}.0", stride=2, padding=1), f"downsample_layers.{s}.1")
        C = x.shape[1]
        for b in range(depth):
            p = f"stages.{s}.{b}."
            x = (x + conv(x, p + "pos_embed", padding=1, groups=C)).permute(0, 2, 3, 1)  # [B, H, W, C]
            h = ln(x, p + "norm1")
            if s < 3:
                w = [sd[p + n] for n in ("attn.qkv.qkv.weight", "attn.qkv.qkv.bias", "attn.lepe.weight")]
                w += [sd[p + n] for n in ("attn.lepe.bias", "attn.wo.weight", "attn.wo.bias")]
                h = reference_bra(h, *w, n_win=n_win, topk=topks[s], n_heads=C // head_dim, scale=C**-0.5)
            else:
                w = [sd[p + "attn.qkv.weight"], None, sd[p + "attn.lepe.weight"], sd[p + "attn.lepe.bias"]]
                w += [sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]]
                hd = C // stage4_heads
                h = reference_bra(h, *w, n_win=1, topk="all", n_heads=stage4_heads, scale=hd**-0.5, lce_on="x")
            x = x + h
            h = ln(x, p + "norm2")
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])), sd[p + "mlp.3.weight"])
            x = (x + h + sd[p + "mlp.3.bias"]).permute(0, 3, 1, 2)
    x = bn(x, "norm")
    return F.linear(x.mean((2, 3)), sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name", ["t", "s", "b"])
def test_paper_configs_are_the_released_architectures(name):
    n_params, depths, dims, s4_head_dim = RELEASED[name]
    model = paper_model(name)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [len(stage) for stage in model.stages] == depths
    for s, stage in enumerate(model.stages):
        for block in stage:
            a = block.attn
            assert block.mlp[0].out_features == 3 * dims[s] and block.pos.kernel_size == (3, 3)
            if s < 3:  # BRA: heads of 32, qkv bias, scale dim**-0.5, 7x7 regions, top-k 1, 4, 16, LCE 5x5 on V
                assert type(a) is BiLevelRoutingAttention and a.qkv.bias is not None
                assert (a.dim, a.n_heads, a.head_dim, a.n_win, a.topk) == (dims[s], dims[s] // 32, 32, 7, [1, 4, 16][s])
                assert a.scale == pytest.approx(dims[s] ** -0.5) and a.lce_input == "v"
            else:  # AttentionLePE: 8 heads, no qkv bias, scale head_dim**-0.5, LePE 5x5 on x
                assert type(a) is AttentionLePE and a.qkv.bias is None
                assert (a.dim, a.n_heads, a.head_dim, a.lce_input) == (dims[3], 8, s4_head_dim, "x")
                assert a.scale == pytest.approx(s4_head_dim**-0.5)
            assert a.lce.kernel_size == (5, 5)
    # a released checkpoint's names and shapes: exactly this model's state dict after conversion
    sd = convert_official_state_dict(released_state_dict(depths, dims, device="meta"))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


SMALL = {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], "topks": [1, 2, 3, "all"], "n_win": 2, "head_dim": 8}


def test_released_checkpoint_converts_loads_strictly_and_gives_the_released_logits():
    g = torch.Generator().manual_seed(0)
    sd = released_state_dict(SMALL["depths"], SMALL["dims"], num_classes=10, gen=g)
    model = arch.build_model({"kind": "biformer", "num_classes": 10, **SMALL}).double().eval()
    model.load_state_dict(convert_official_state_dict({"model": sd, "epoch": 299}), strict=True)
    images = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)  # stages 8, 4, 2, 1 tokens per side
    with torch.no_grad():
        got = model(images)
    want = released_forward(sd, images, SMALL["depths"], SMALL["topks"], n_win=2, head_dim=8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert convert_official_state_dict({f"module.{k}": v for k, v in sd.items()}).keys() == model.state_dict().keys()


def test_converter_rejects_keys_of_other_architectures():
    sd = released_state_dict([1, 1, 1, 1], [16, 32, 48, 64], device="meta")
    with pytest.raises(ValueError, match="stages.0.0.attn.router.emb.weight"):
        convert_official_state_dict({**sd, "stages.0.0.attn.router.emb.weight": torch.empty(1)})


def test_stage4_options_keep_the_earlier_variant():
    m = arch.build_model({"kind": "biformer", **SMALL, "stage4": "bra", "scale": "head_dim"})
    a = m.stages[3][0].attn
    assert type(a) is BiLevelRoutingAttention and a.qkv.bias is not None and a.lce_input == "v"
    assert a.scale == pytest.approx(8**-0.5) and a.n_heads == 64 // 8
    with pytest.raises(arch.ConfigError, match=r"model.topks\[3\]: 2 needs model.stage4: bra"):
        arch.build_model({"kind": "biformer", **{**SMALL, "topks": [1, 2, 3, 2]}})
    with pytest.raises(arch.ConfigError, match=r"model.stage4_heads: 7 must divide model.dims\[3\]=64"):
        arch.build_model({"kind": "biformer", **SMALL, "stage4_heads": 7})
    with pytest.raises(arch.ConfigError, match="model.stage4_heads is only used by model.stage4: attention_lepe"):
        arch.build_model({"kind": "biformer", **SMALL, "stage4": "bra", "stage4_heads": 4})
