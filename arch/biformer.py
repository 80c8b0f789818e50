"""BiFormer backbone (Zhu et al., CVPR 2023, Sec. 3.3 and Table 1; released code: models/biformer.py).

Two-conv stem (stride 4), four stages separated by 3×3 stride-2 conv downsampling; each block is
``x + dwconv3x3(x)`` (positional encoding), then pre-norm ``x + attn(LN(x))`` and ``x + MLP(LN(x))`` (ratio 3);
final BatchNorm, global average pooling, linear classifier. ``forward(images [B, C, H, W]) -> logits [B, classes]``.

The defaults are the released BiFormer-T, and the paper configs (``configs/paper/biformer-{t,s,b}.yaml``) are the
released architectures exactly (13,142,760 / 25,536,232 / 56,804,968 parameters at 1000 classes): stages 1-3
are BRA with qkv bias and the released scale dim**-0.5; stage 4 is the released ``AttentionLePE`` (full
attention, 8 heads, no qkv bias, LePE on x), not BRA. ``stage4: bra`` and ``scale: head_dim`` keep the
earlier variant (BRA with one region in stage 4, head_dim**-0.5). ``convert_official_state_dict`` maps a released
checkpoint onto these modules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from kernels.block_sparse.api import Impl

from .bra import AttentionLePE, BiLevelRoutingAttention, TopK, is_all
from .registry import MODELS, ConfigError, check_fields, fields_of_dataclass


@dataclasses.dataclass
class BiFormerConfig:
    """Keys of a BiFormer config (``kind: biformer``). Paper / released code: T = depths 2,2,8,2, dims
    64,128,256,512; S = 4,4,18,4, same dims; B = 4,4,18,4, dims 96,192,384,768; all with topks 1,4,16 in
    stages 1-3, n_win 7, head_dim 32, and stage 4 = ``AttentionLePE`` with 8 heads."""

    kind: Literal["biformer"] = "biformer"
    num_classes: int = 1000
    in_chans: int = 3
    image_size: int = 224  # the size `python -m train info` counts FLOPs at; any size runs
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 8, 2])
    dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256, 512])
    topks: list[TopK] = dataclasses.field(default_factory=lambda: [1, 4, 16, "all"])
    n_win: int = 7
    head_dim: int = 32  # BRA heads = dim / head_dim
    mlp_ratio: float = 3.0
    scale: Literal["head_dim", "dim"] = "dim"  # BRA's scale; "dim": the released code's dim**-0.5
    # stage 4: "attention_lepe" = the released AttentionLePE (topks[3] must be all); "bra" = BRA with topks[3]
    stage4: Literal["attention_lepe", "bra"] = "attention_lepe"
    stage4_heads: int = 8  # AttentionLePE heads (8 in every released model)
    drop_path: float = 0.0  # stochastic depth rate at the last block (linear in depth), 0.1 for T in the paper
    impl: Impl = "auto"  # kernels.block_sparse implementation of the BRA blocks


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch of a whole sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *[1] * (x.ndim - 1), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """x + pos(x) (depthwise 3×3 conv), then x + attn(LN(x)), x + MLP(LN(x)) (pre-norm), on [B, C, H, W]."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        x = (x + self.pos(x)).permute(0, 2, 3, 1)  # [B, H, W, C]
        x = x + self.drop(self.attn(self.norm1(x)))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def make_attention(c: dict, stage: int) -> nn.Module:
    """The token mixer of a block of ``stage`` (0-3): BRA, or the released ``AttentionLePE`` in stage 4."""
    dim, topk = c["dims"][stage], c["topks"][stage]
    if stage == 3 and c["stage4"] == "attention_lepe":
        if not is_all(topk):
            raise ConfigError(
                f"model.topks[3]: {topk} needs model.stage4: bra; stage4 'attention_lepe' is full attention "
                "(topks[3]: all)"
            )
        if c["stage4_heads"] < 1 or dim % c["stage4_heads"]:
            raise ConfigError(f"model.stage4_heads: {c['stage4_heads']} must divide model.dims[3]={dim}")
        return AttentionLePE(dim, n_heads=c["stage4_heads"])
    if stage == 3 and c["stage4_heads"] != 8:
        raise ConfigError("model.stage4_heads is only used by model.stage4: attention_lepe (stage 4 is BRA here)")
    return BiLevelRoutingAttention(
        dim, n_win=c["n_win"], topk=topk, head_dim=c["head_dim"], scale=c["scale"], impl=c["impl"]
    )


@MODELS.register("biformer")
class BiFormer(nn.Module):
    task = "classification"

    def paper_reference(self) -> dict | None:
        """The paper's size of this architecture (Table 1), if it is one of BiFormer-T/S/B: name, parameters (M,
        1000 classes), GMACs at 224² (fvcore counts multiply-adds)."""
        ref = PAPER_SIZES.get((tuple(self.config["depths"]), tuple(self.config["dims"])))
        return None if ref is None else dict(zip(("name", "params_m", "gmacs"), ref))

    @staticmethod
    def convert_released(state_dict: Mapping) -> dict:
        """A released checkpoint's state dict in our names (``convert_official_state_dict``): the hook through which
        ``python -m train eval/info --weights`` loads the authors' weights of any model kind that has one."""
        return convert_official_state_dict(state_dict)

    def __init__(self, cfg: Mapping):
        super().__init__()
        c = check_fields(cfg, fields_of_dataclass(BiFormerConfig), "model")
        for key in ("depths", "dims", "topks"):
            if len(c[key]) != 4:
                raise ConfigError(f"model.{key}: expected 4 values (one per stage), got {c[key]}")
        self.config = c
        d = c["dims"]
        down = [
            nn.Sequential(
                nn.Conv2d(c["in_chans"], d[0] // 2, 3, 2, 1),
                nn.BatchNorm2d(d[0] // 2),
                nn.GELU(),
                nn.Conv2d(d[0] // 2, d[0], 3, 2, 1),
                nn.BatchNorm2d(d[0]),
            )
        ]
        down += [nn.Sequential(nn.Conv2d(d[i], d[i + 1], 3, 2, 1), nn.BatchNorm2d(d[i + 1])) for i in range(3)]
        self.downsample = nn.ModuleList(down)
        n = sum(c["depths"])
        rates = [c["drop_path"] * i / max(n - 1, 1) for i in range(n)]
        stages, i = [], 0
        for s in range(4):
            try:
                blocks = [
                    Block(d[s], make_attention(c, s), c["mlp_ratio"], rates[i + j]) for j in range(c["depths"][s])
                ]
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(
                    msg if msg.startswith("model.") else f"model.topks[{s}] / model.dims[{s}]: {msg}"
                ) from None
            stages.append(nn.Sequential(*blocks))
            i += c["depths"][s]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(d[-1])
        self.head = nn.Linear(d[-1], c["num_classes"])
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # released code: trunc_normal(0.02) linears, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images  # [B, C, H, W]
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))  # [B, d_s, H / 2^(s+2), W / 2^(s+2)]
        return self.head(self.norm(x).mean((2, 3)))  # [B, classes]


# BiFormer paper, Table 1 (ImageNet-1k, 224×224): (depths, dims) -> (name, params M, GFLOPs as fvcore counts them,
# i.e. multiply-accumulates)
PAPER_SIZES = {
    ((2, 2, 8, 2), (64, 128, 256, 512)): ("BiFormer-T", 13.1, 2.2),
    ((4, 4, 18, 4), (64, 128, 256, 512)): ("BiFormer-S", 25.5, 4.5),
    ((4, 4, 18, 4), (96, 192, 384, 768)): ("BiFormer-B", 56.8, 9.8),
}


# Released checkpoint names (rayleizhu/BiFormer models/biformer.py, models/_common.py, ops/bra_legacy.py) -> ours.
# Stages 1-3: attn = BiLevelRoutingAttention {qkv: QKVLinear{qkv}, lepe, wo}; stage 4: AttentionLePE {qkv, proj,
# lepe}; mlp = Sequential(Linear, Identity, GELU, Linear); pos_embed = the 3×3 depthwise conv.
OFFICIAL_KEYS = [
    (r"downsample_layers\.(\d+)\.(\d+)\.(.+)", r"downsample.\1.\2.\3"),
    (r"stages\.(\d+)\.(\d+)\.pos_embed\.(weight|bias)", r"stages.\1.\2.pos.\3"),
    (r"stages\.(\d+)\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"stages.\1.\2.\3.\4"),
    (r"stages\.(\d+)\.(\d+)\.attn\.qkv(?:\.qkv)?\.(weight|bias)", r"stages.\1.\2.attn.qkv.\3"),
    (r"stages\.(\d+)\.(\d+)\.attn\.lepe\.(weight|bias)", r"stages.\1.\2.attn.lce.\3"),
    (r"stages\.(\d+)\.(\d+)\.attn\.(?:wo|proj)\.(weight|bias)", r"stages.\1.\2.attn.wo.\3"),
    (r"stages\.(\d+)\.(\d+)\.mlp\.0\.(weight|bias)", r"stages.\1.\2.mlp.0.\3"),
    (r"stages\.(\d+)\.(\d+)\.mlp\.3\.(weight|bias)", r"stages.\1.\2.mlp.2.\3"),
    (r"norm\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"norm.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
]


def convert_official_state_dict(state_dict: Mapping) -> dict:
    """A released BiFormer checkpoint (rayleizhu/BiFormer: the file's ``{"model": state_dict, ...}`` or the
    state dict itself; a DDP ``module.`` prefix is dropped) -> a state dict for ``BiFormer`` built from the
    matching paper config (``configs/paper/biformer-{t,s,b}.yaml``), to load with ``load_state_dict(strict=True)``.
    Tensors are not copied. A key of another architecture (e.g. learned routing, layer scale) raises
    ValueError naming it."""
    sd = state_dict["model"] if "model" in state_dict and isinstance(state_dict["model"], Mapping) else state_dict
    out = {}
    for key, tensor in sd.items():
        name = key.removeprefix("module.")
        for pattern, repl in OFFICIAL_KEYS:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = tensor
                break
        else:
            raise ValueError(
                f"convert_official_state_dict: {key!r} is not a key of the released BiFormer-T/S/B; known keys: "
                "downsample_layers.*, stages.*.*.{pos_embed, norm1, norm2, attn.qkv[.qkv], attn.lepe, attn.wo, "
                "attn.proj, mlp.0, mlp.3}, norm.*, head.*"
            )
    return out
